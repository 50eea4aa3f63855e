"""Camera frames for the encoder: JPEG decode -> resize to width W -> crop the top rows to H.

DESIGN.md §4: an image is resized to the bucket width keeping its aspect, then the top
``resized_h - H`` rows are dropped (900x1600 -> 848x1600 at full width); intrinsics follow
via ``pipeline.contract.geometry.resize_crop_intrinsics``. Frames stay uint8 until the GPU.

Speed: the JPEG decoder can do part of the downscale in the DCT (PIL ``draft``: 1/2, 1/4,
1/8), which skips most of the IDCT work. We only let it reduce to a size that is still
>= the target, then finish with an area resize, so quality matches a full-size decode +
area resize (bench/encode.py measures the PSNR between the two and the speed-up).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image

cv2.setNumThreads(1)  # one decode per worker core; Ray gives the parallelism


class FrameError(Exception):
    """A source frame that cannot be used (missing, unreadable, corrupt); the message says which and why."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")


def resized_height(src_size: tuple[int, int], width: int) -> int:
    """Rows of a (W0, H0) image after resizing to ``width`` keeping its aspect (same rule as the intrinsics)."""
    w0, h0 = src_size
    return int(round(h0 * width / w0))


def decode_resize_crop(path: str, width: int, height: int, draft: bool = True) -> np.ndarray:
    """One JPEG -> (H, W, 3) uint8 RGB: resize to width W (aspect kept), drop the top rows down to H.

    Raises FrameError for a missing, unreadable or truncated file (the build quarantines its clips)."""
    if not os.path.exists(path):
        raise FrameError(path, "file is missing (check the dataroot and that the sweeps/ folder is complete)")
    try:
        with Image.open(path) as im:
            src = im.size  # (W0, H0) before any draft reduction
            rh = resized_height(src, width)
            if rh < height:
                raise FrameError(path, f"image {src[0]}x{src[1]} resized to width {width} has {rh} rows, fewer "
                                       f"than the bucket height {height}")
            if draft and im.format == "JPEG":
                im.draft("RGB", (width, rh))  # DCT scaling to the smallest size still >= target
            im = im.convert("RGB")
            im.load()  # truncated / corrupt data raises here, not later
            arr = np.asarray(im)
    except FrameError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise FrameError(path, f"cannot decode image ({type(e).__name__}: {e}); the file is corrupt or not a JPEG; "
                               "re-download it or remove the scene") from None
    if arr.shape[1] != width or arr.shape[0] != rh:
        arr = cv2.resize(arr, (width, rh), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(arr[rh - height:])  # top crop: keep the bottom H rows


def full_decode_resize_crop(path: str, width: int, height: int) -> np.ndarray:
    """Baseline for the bench: full-size cv2 decode + cv2 area resize + the same crop."""
    arr = cv2.imread(path, cv2.IMREAD_COLOR)
    if arr is None:
        raise FrameError(path, "cannot decode image")
    arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    rh = resized_height((arr.shape[1], arr.shape[0]), width)
    arr = cv2.resize(arr, (width, rh), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(arr[rh - height:])


@dataclass
class FrameSet:
    """Decoded frames of one (scene, resolution): every needed source frame exactly once.

    ``pixels[i]`` is the frame at ``paths[i]`` (paths relative to the dataroot, sorted);
    ``errors`` maps a path that failed to its reason (its row in ``pixels`` is zeros)."""
    height: int
    width: int
    paths: list[str]
    pixels: np.ndarray                       # (P, H, W, 3) uint8
    errors: dict[str, str] = field(default_factory=dict)

    def index(self) -> dict[str, int]:
        return {p: i for i, p in enumerate(self.paths)}


def decode_frames(dataroot: str, paths: list[str], width: int, height: int, draft: bool = True) -> FrameSet:
    """Decode each distinct path once (sorted, so the result does not depend on the caller's order)."""
    uniq = sorted(set(paths))
    pixels = np.zeros((len(uniq), height, width, 3), np.uint8)  # (P, H, W, 3)
    errors: dict[str, str] = {}
    for i, rel in enumerate(uniq):
        try:
            pixels[i] = decode_resize_crop(os.path.join(dataroot, rel), width, height, draft=draft)
        except FrameError as e:
            errors[rel] = e.reason
    return FrameSet(height, width, uniq, pixels, errors)
