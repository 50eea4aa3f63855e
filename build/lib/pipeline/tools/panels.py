"""Text, labels and legends for the PNG previews (mdv2-inspect --png, the sampler's contact_sheet.png).

Text is drawn in its own bands, never over the images, and wrapped to the picture's width so nothing is cut
at the right edge. Colours: pipeline.tools.inspect's CLASS_RGB (boxes) and MAP_PAINT (BEV layers).
"""
from __future__ import annotations

import cv2
import numpy as np

FONT = cv2.FONT_HERSHEY_SIMPLEX
TEXT_SCALE = 0.5        # ~11 px capitals: readable at 100 % zoom
LINE_PX = 20
PAD_PX = 6
WHITE, BACKGROUND = (255, 255, 255), (24, 24, 24)


def text_width(text: str, scale: float = TEXT_SCALE) -> int:
    return cv2.getTextSize(text, FONT, scale, 1)[0][0]


def wrap(text: str, width: int, scale: float = TEXT_SCALE) -> list[str]:
    """Words of ``text`` in lines that fit ``width`` pixels (a word longer than a line is cut in pieces)."""
    lines, line = [], ""
    for word in text.split():
        while text_width(word, scale) > width - 2 * PAD_PX and len(word) > 1:
            cut = max(1, int(len(word) * (width - 2 * PAD_PX) / text_width(word, scale)) - 1)
            if line:
                lines.append(line)
                line = ""
            lines.append(word[:cut])
            word = word[cut:]
        trial = f"{line} {word}".strip()
        if line and text_width(trial, scale) > width - 2 * PAD_PX:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def text_band(text: str | list[str], width: int, scale: float = TEXT_SCALE) -> np.ndarray:
    """(h, width, 3) uint8: the text (a string, or paragraphs) wrapped onto as many lines as it needs."""
    paragraphs = [text] if isinstance(text, str) else text
    lines = [ln for p in paragraphs for ln in (wrap(p, width, scale) or [""])]
    band = np.full((len(lines) * LINE_PX + PAD_PX, width, 3), BACKGROUND, np.uint8)
    for i, ln in enumerate(lines):
        cv2.putText(band, ln, (PAD_PX, (i + 1) * LINE_PX - 4), FONT, scale, WHITE, 1, cv2.LINE_AA)
    return band


def legend_band(entries: list[tuple[str, tuple[int, int, int]]], width: int, title: str = "") -> np.ndarray:
    """(h, width, 3) uint8: a colour swatch and a name per entry, flowing over as many lines as needed."""
    items = ([(title, None)] if title else []) + list(entries)
    rows: list[list[tuple[str, tuple | None, int]]] = [[]]
    x = PAD_PX
    for name, rgb in items:
        w = text_width(name) + (22 if rgb is not None else 8) + 14
        if x + w > width - PAD_PX and rows[-1]:
            rows.append([])
            x = PAD_PX
        rows[-1].append((name, rgb, x))
        x += w
    band = np.full((len(rows) * LINE_PX + PAD_PX, width, 3), BACKGROUND, np.uint8)
    for r, row in enumerate(rows):
        base = (r + 1) * LINE_PX - 4
        for name, rgb, x0 in row:
            if rgb is not None:
                cv2.rectangle(band, (x0, base - 11), (x0 + 14, base + 1), tuple(int(c) for c in rgb), -1)
                x0 += 20
            cv2.putText(band, name, (x0, base), FONT, TEXT_SCALE, WHITE, 1, cv2.LINE_AA)
    return band


def labelled(img: np.ndarray, label: str) -> np.ndarray:
    """The image with its label in a band above it (not over the picture), 1 px dark frame."""
    band = text_band(label, img.shape[1])
    return np.pad(np.concatenate([band, img], 0), ((1, 1), (1, 1), (0, 0)))


def enlarge(img: np.ndarray, scale: int) -> np.ndarray:
    h, w = img.shape[:2]
    return img if scale == 1 else cv2.resize(img, (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)


def scale_intrinsics(k: np.ndarray, scale: int) -> np.ndarray:
    """K for an image enlarged ``scale`` times by pixel repetition: pixel (u, v) of the small image covers the
    big pixels centred at s*u + (s-1)/2."""
    k = np.array(k, np.float64, copy=True)
    k[..., :2, :] *= scale
    k[..., :2, 2] += (scale - 1) / 2
    return k


def readable_scale(width: int, target: int = 320) -> int:
    """The integer enlargement that makes a view at least ``target`` pixels wide."""
    return max(1, int(np.ceil(target / width)))
