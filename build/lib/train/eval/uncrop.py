"""Undo the pipeline's resize and top crop: a generated H x W frame back to the camera's original W0 x H0.

The pipeline (pipeline/shards/frames.py) resizes an original W0 x H0 image to width W keeping its
aspect (``rh = round(H0 * W / W0)`` rows) and drops the top ``rh - H`` rows. The inverse puts the
generated frame where its pixels came from: resized to W0 x (H0 - top) with top = round((rh - H) *
H0 / rh), below ``top`` rows the generator never saw. Those rows are black by default, as the
authors do (their test configs: ``post = dict(resize=[848, 1600], padding=[0, 52, 0, 0])``, i.e.
848x1600 unchanged, 52 black rows on top -> 1600x900); ``top_rows="real"`` keeps the original
image's rows there instead. Upscaling is bicubic (cv2, the kernel of torchvision's tensor bicubic);
at 848x1600 nothing is resized and the generated pixels are copied exactly.
"""
from __future__ import annotations

import cv2
import numpy as np

from pipeline.shards.frames import resized_height

TOP_ROWS = ("black", "real")


def top_rows(source_size: tuple[int, int], width: int, height: int) -> int:
    """Rows of the original image above the part the generated frame covers."""
    w0, h0 = source_size
    rh = resized_height((w0, h0), width)
    if rh < height:
        raise ValueError(f"a {w0}x{h0} image resized to width {width} has {rh} rows, fewer than {height}")
    return int(round((rh - height) * h0 / rh))


def restore(frame: np.ndarray, source_size: tuple[int, int], fill: str = "black",
            original: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 3) uint8 generated frame -> (H0, W0, 3) uint8 at the camera's original geometry."""
    h, w = frame.shape[:2]
    w0, h0 = source_size
    top = top_rows(source_size, w, h)
    body = frame if (w, h) == (w0, h0 - top) else cv2.resize(frame, (w0, h0 - top), interpolation=cv2.INTER_CUBIC)
    out = np.zeros((h0, w0, 3), np.uint8)
    if fill == "real":
        if original is None or original.shape != out.shape:
            raise ValueError("top_rows='real' needs the original image of the same size")
        out[:top] = original[:top]
    elif fill != "black":
        raise ValueError(f"fill {fill!r} is not one of {TOP_ROWS}")
    out[top:] = body
    return out
