"""The real frames of a generated clip, read from the nuScenes dataroot at the generated geometry.

The generator was trained on frames the pipeline made by resizing each original image to width W
(aspect kept) and dropping the top rows down to height H; the real side of every metric goes
through that same function (pipeline/shards/frames.py ``decode_resize_crop``, draft decoding as in
the build) so that real and generated frames show the same part of the scene, pixel for pixel in
geometry, before the protocol's own resize.
"""
from __future__ import annotations

import os

import numpy as np

from pipeline.contract import cli
from pipeline.shards.frames import FrameError, decode_resize_crop
from train.eval.generated import Generation


def real_frame_path(dataroot: str, rel: str) -> str:
    return os.path.join(dataroot, rel)


def read_real(dataroot: str, g: Generation, view: str, indices: list[int], draft: bool = True) -> np.ndarray:
    """(N, H, W, 3) uint8: the source images of one view of clip ``g`` at the clip's H x W."""
    j = g.view_index(view)
    out = np.empty((len(indices), g.height, g.width, 3), np.uint8)
    for i, t in enumerate(indices):
        rel = g.source_frames[t][j]
        path = real_frame_path(dataroot, rel)
        if not os.path.isfile(path):
            raise cli.InputNotFound(f"real frame {path} is missing (clip {g.key}, frame {t}, {view}); --dataroot "
                                    "must be the nuScenes root the shards were built from, with samples/ and sweeps/")
        try:
            out[i] = decode_resize_crop(path, g.width, g.height, draft=draft)
        except FrameError as e:
            raise cli.BadInput(f"real frame {e.path} (clip {g.key}): {e.reason}") from None
    return out


def check_real_frames(dataroot: str, clips: list[Generation], indices_of) -> None:
    """Fail before any heavy work when a source image is absent."""
    if not os.path.isdir(dataroot):
        raise cli.InputNotFound(f"--dataroot {dataroot} is not a folder: pass the nuScenes root (samples/, sweeps/)")
    for g in clips:
        for j, view in enumerate(g.views):
            for t in indices_of(g):
                path = real_frame_path(dataroot, g.source_frames[t][j])
                if not os.path.isfile(path):
                    raise cli.InputNotFound(f"real frame {path} is missing (clip {g.key}, frame {t}, {view}); "
                                            "--dataroot must be the nuScenes root the shards were built from")
