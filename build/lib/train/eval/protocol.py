"""The evaluation protocol: which frames of a clip are scored and how they are resized before the network.

The paper's FVD (the authors' issues #61 and #74, the W-CODA 2024 Track-2 toolkit):
  1. real frames are brought to the generated geometry first -- the pipeline's own resize to width W
     and top crop to height H (pipeline/shards/frames.py), so real and generated frames cover the
     same pixels (the toolkit does the same on 1600x900 frames: it crops the rows the generator's
     padding covered);
  2. the first 16 frames (17 generated, cut to 16);
  3. both sides downsampled x0.25 with PIL bicubic (848x1600 -> 212x400; the toolkit's default of
     224 rows was the authors' mistake for 848-high clips: issue #61);
  4. VideoGPT's preprocessing: the shorter side bilinearly resized to 224 (212x400 -> 224x423),
     the centre 224x224 kept, values to [-1, 1]; the I3D's 400 Kinetics logits are the features.
The toolkit's ToTensor / x255 / uint8 round trip is exact in float32 for all 256 levels, so it is left out.

FID (MagicDrive's tools/fid_score.py, which the paper follows for images): frames at the generated
geometry, no downsampling or crop here; pytorch-fid's InceptionV3 resizes to 299x299 itself.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass(frozen=True)
class Protocol:
    frames: int | None = 16        # first N frames of each clip; None = all
    downsample: float = 0.25       # both sides x this, PIL bicubic; 1.0 = none
    crop: int | None = 224         # shorter side bilinearly to this, then the centre square; None = none
    keyframes_only: bool = False   # score only frames whose source image is a keyframe (FID)

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        if self.frames is not None and self.frames < 1:
            raise ValueError(f"frames must be >= 1 (or all), got {self.frames}")
        if not 0.0 < self.downsample <= 1.0:
            raise ValueError(f"downsample must be in (0, 1], got {self.downsample}")
        if self.crop is not None and self.crop < 1:
            raise ValueError(f"crop must be >= 1 (or none), got {self.crop}")


FVD_PROTOCOL = Protocol()
FID_PROTOCOL = Protocol(frames=16, downsample=1.0, crop=None)


def frame_indices(num_frames: int, protocol: Protocol) -> list[int]:
    """The frames of a clip of ``num_frames`` that are scored (ValueError when the clip is too short)."""
    n = protocol.frames or num_frames
    if num_frames < n:
        raise ValueError(f"the clip has {num_frames} frames, the protocol scores the first {n}")
    return list(range(n))


def downsampled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """(h, w) after the x``scale`` downsample; truncating like the toolkit's int(size * ratio) (848 -> 212)."""
    return max(1, int(height * scale + 1e-6)), max(1, int(width * scale + 1e-6))


def downsample(frames: np.ndarray, scale: float) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, h, w, 3) uint8, PIL bicubic (the toolkit's TF.Resize on PIL images)."""
    if scale == 1.0:
        return frames
    h, w = downsampled_size(frames.shape[1], frames.shape[2], scale)
    return np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.BICUBIC)) for f in frames])


def centre_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """VideoGPT's crop: (N, 3, h, w) float -> shorter side bilinearly to ``size`` (other side rounded up), centre square."""
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    target = (size, math.ceil(w * scale)) if h < w else (math.ceil(h * scale), size)
    x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


def prepare(frames: np.ndarray, protocol: Protocol) -> torch.Tensor:
    """(N, H, W, 3) uint8 frames -> (N, 3, h, w) float32 in [0, 1] after the protocol's downsample and crop."""
    small = downsample(frames, protocol.downsample)
    x = torch.from_numpy(np.ascontiguousarray(small)).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, h, w)
    if protocol.crop is not None:
        x = centre_crop(x, protocol.crop)
    return x.contiguous()


def i3d_input(clip: np.ndarray, protocol: Protocol) -> torch.Tensor:
    """One view's clip (T, H, W, 3) uint8 -> (3, T, R, R) float32 in [-1, 1], the I3D's input."""
    x = prepare(clip, protocol)            # (T, 3, R, R) in [0, 1]
    return (x * 2.0 - 1.0).permute(1, 0, 2, 3).contiguous()
