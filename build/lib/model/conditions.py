"""The condition bundle MVDiT consumes (one batch).

Shapes follow the sample contract (pipeline/contract/schema.py) with a batch axis in front.
T is the pixel-frame count (any 4k+1); the latent has T' = (T - 1) // 4 + 1 frames.
Geometry follows schema 2.0's time model: reference boxes at CAM_FRONT's exposure, each view's
boxes and extrinsics at that view's own exposure, all in LiDAR(t) (the frame of `traj` and `bev`).
model/native.py turns a bundle into the authors' model inputs (reference boxes repeated per
view by default, or each view's own boxes with ModelConfig.boxes_per_view).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

import torch

from pipeline.contract import schema


@dataclass
class Conditions:
    text: torch.Tensor           # (B, L, D_text) float, T5 states (the first padding state after each caption kept)
    text_mask: torch.Tensor      # (B, L) bool, True = real token
    intrinsics: torch.Tensor     # (B, V, 3, 3) at the stored image resolution
    cam2lidar: torch.Tensor      # (B, T, V, 4, 4) camera v at its exposure -> LiDAR(t)
    boxes: torch.Tensor          # (B, T, N, 7) reference boxes x y z w l h yaw at CAM_FRONT's exposure, LiDAR(t)
    view_boxes: torch.Tensor     # (B, T, V, N, 7) the same objects at view v's exposure, in LiDAR(t)
    box_class: torch.Tensor      # (B, N) long, class id 0-9
    box_mask: torch.Tensor       # (B, T, N) bool, False = padding / absent in that frame
    box_view_mask: torch.Tensor  # (B, T, V, N) bool, box visible in view
    traj: torch.Tensor           # (B, T, 4, 4) LiDAR(t) -> LiDAR(0)
    bev: torch.Tensor            # (B, T, 8, G, G) float in {0, 1}
    source_intrinsics: torch.Tensor | None = None  # (B, V, 3, 3) K of the original image (e.g. 1600x900);
                                                   # None: the stored K stands in (older shards)
    fps: torch.Tensor | None = None                # (B,) None: 12, or 120 for one frame (the authors')
    box_latent: torch.Tensor | None = None         # (B, N, D) per-box N(0, 1) draw (MVDiT.draw_box_latent)

    @property
    def batch_size(self) -> int:
        return int(self.text.shape[0])

    @property
    def num_frames(self) -> int:
        return int(self.traj.shape[1])

    @property
    def num_views(self) -> int:
        return int(self.intrinsics.shape[1])

    def replace(self, **kw) -> "Conditions":
        return dataclasses.replace(self, **kw)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Conditions":
        """Move every tensor; `dtype` applies to floating tensors only (masks/ids keep theirs)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                out[f.name] = None
            elif dtype is not None and v.is_floating_point():
                out[f.name] = v.to(device=device, dtype=dtype)
            else:
                out[f.name] = v.to(device=device)
        return Conditions(**out)

    def check(self, batch: int | None = None, views: int | None = None) -> None:
        """Raise ValueError naming the field whose shape disagrees with the others."""
        B = self.batch_size if batch is None else batch
        V = self.num_views if views is None else views
        T, N = self.num_frames, self.box_class.shape[1]
        L = self.text.shape[1]
        want = {
            "text_mask": (B, L), "intrinsics": (B, V, 3, 3), "cam2lidar": (B, T, V, 4, 4), "boxes": (B, T, N, 7),
            "view_boxes": (B, T, V, N, 7), "box_class": (B, N), "box_mask": (B, T, N),
            "box_view_mask": (B, T, V, N), "traj": (B, T, 4, 4), "source_intrinsics": (B, V, 3, 3), "fps": (B,),
        }
        if self.text.dim() != 3 or self.text.shape[0] != B:
            raise ValueError(f"Conditions.text: expected (B={B}, L, D), got {tuple(self.text.shape)}")
        for name, shape in want.items():
            v = getattr(self, name)
            if v is not None and tuple(v.shape) != shape:
                raise ValueError(f"Conditions.{name}: expected shape {shape}, got {tuple(v.shape)}")
        if self.box_latent is not None and tuple(self.box_latent.shape[:2]) != (B, N):
            raise ValueError(f"Conditions.box_latent: expected (B={B}, N={N}, D), got {tuple(self.box_latent.shape)}")
        if self.bev.dim() != 5 or tuple(self.bev.shape[:2]) != (B, T):
            raise ValueError(f"Conditions.bev: expected (B={B}, T={T}, 8, G, G), got {tuple(self.bev.shape)}")
        if not schema.valid_num_frames(T):
            raise ValueError(f"Conditions: T={T} pixel frames; the model takes any 4k+1 (schema.valid_num_frames)")


def latent_len(t: int) -> int:
    """Pixel frames -> CogVAE latent frames (first frame alone, then groups of 4)."""
    return schema.latent_frames(t)


def random_conditions(batch: int, views: int, frames: int, boxes: int = 4, text_len: int = 8,
                      text_dim: int = 32, bev_size: int = 200, generator: torch.Generator | None = None,
                      ) -> Conditions:
    """A plausible random bundle for tests/benches: boxes within 40 m moving slowly, ~30 % of the
    tracks padded (absent in every frame), cameras spread around the ring, random BEV bits.
    Per-view geometry as the rig makes it: view v fires 7 ms after view v-1, so its boxes are
    shifted along their velocity and its extrinsics by the ego's motion (0.5 m per frame)."""
    g = generator
    B, V, T, N = batch, views, frames, boxes
    xyz = (torch.rand(B, 1, N, 3, generator=g) - 0.5) * torch.tensor([80.0, 80.0, 2.0])
    vel = (torch.rand(B, 1, N, 3, generator=g) - 0.5) * torch.tensor([1.0, 1.0, 0.0])
    t = torch.arange(T, dtype=torch.float32).view(1, T, 1, 1, 1)
    dt = (torch.arange(V, dtype=torch.float32) * 0.084).view(1, 1, V, 1, 1)  # 7 ms in frames of 83 ms
    centre = xyz[:, :, None] + vel[:, :, None] * (t + dt)                # (B, T, V, N, 3)
    size = (1.0 + 3.0 * torch.rand(B, 1, 1, N, 3, generator=g)).expand(B, T, V, N, 3)
    yaw = ((torch.rand(B, 1, 1, N, 1, generator=g) - 0.5) * 6.28).expand(B, T, V, N, 1)
    box_mask = torch.rand(B, 1, N, generator=g).expand(B, T, N) > 0.3
    K = torch.tensor([[100.0, 0, 64.0], [0, 100.0, 32.0], [0, 0, 1]]).expand(B, V, 3, 3).clone()
    c2l = torch.eye(4).expand(B, T, V, 4, 4).clone()
    ang = torch.arange(V, dtype=torch.float32) * (6.2832 / V)
    c2l[..., 0, 0], c2l[..., 0, 2] = torch.cos(ang), torch.sin(ang)
    c2l[..., 2, 0], c2l[..., 2, 2] = -torch.sin(ang), torch.cos(ang)
    c2l[..., 1, 3] = 0.5 * dt.view(1, 1, V)                              # the ego moved on since CAM_FRONT
    t = t.view(1, T, 1, 1)
    traj = torch.eye(4).expand(B, T, 4, 4).clone()
    traj[..., 1, 3] = t.view(1, T) * 0.5
    view_boxes = torch.cat([centre, size, yaw], -1).contiguous()
    return Conditions(
        text=torch.randn(B, text_len, text_dim, generator=g),
        text_mask=torch.arange(text_len).expand(B, text_len) < text_len - 2,
        intrinsics=K, cam2lidar=c2l, boxes=view_boxes[:, :, 1].clone() if V > 1 else view_boxes[:, :, 0].clone(),
        view_boxes=view_boxes,
        box_class=torch.randint(0, 10, (B, N), generator=g),
        box_mask=box_mask.contiguous(),
        box_view_mask=torch.rand(B, T, V, N, generator=g) > 0.5,
        traj=traj,
        bev=(torch.rand(B, T, 8, bev_size, bev_size, generator=g) > 0.7).float(),
    )
