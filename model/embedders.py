"""Condition encoders of MVDiT (paper Sections 4.2-4.3, Figure 4).

- timestep: sinusoidal features of 1000 * t -> MLP (t is the rectified-flow time in [0, 1]);
- text: MLP projection of T5 encoder states;
- camera: MLP on Fourier features of (K normalised by the image size, R, t) per view and pixel
  frame (schema 2.0: cam2lidar[t, v] is camera v at its own exposure -> LiDAR(t), so it moves
  with the ego), then a learned merge of each CogVAE group -> one token per view and latent frame;
- boxes: each view's own boxes (view_boxes[t, v], at v's exposure): per-frame MLP on Fourier
  features of the 8 corners + class embedding, then the spatial-temporal encoder, one track
  per (view, object): a causal temporal transformer with RoPE over the whole clip, then a
  learned merge of each CogVAE group (first frame alone, then groups of 4) into one latent
  frame, so T -> T' = (T - 1) // 4 + 1 without reduce-and-repeat (the paper's "4x down", Fig. 4b);
- trajectory: the same spatial-temporal encoder with an MLP on the ego poses.

CogVAE grouping of pixel frames (frame 0 alone, then 4k-3..4k -> latent k) is `latent_groups`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.blocks import Attention, Mlp, rope_cos_sin

# Corner order of pipeline.contract.geometry.box_corners: bottom face (z-) then top face (z+), each
# (+l,+w), (+l,-w), (-l,-w), (-l,+w) in the box frame (x along the heading).
_CORNER_SIGNS = torch.tensor([[sx, sy, sz] for sz in (-1, 1) for sx, sy in ((1, 1), (1, -1), (-1, -1), (-1, 1))],
                             dtype=torch.float32)  # (8, 3)
METRIC_SCALE = 50.0  # metres -> ~unit range (BEV half extent) before Fourier features


def box_corners(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 7) x y z w l h yaw -> (..., 8, 3) corners; torch twin of pipeline.contract.geometry.box_corners."""
    half = torch.stack([boxes[..., 4], boxes[..., 3], boxes[..., 5]], -1)[..., None, :] / 2   # (l, w, h)/2
    local = _CORNER_SIGNS.to(boxes) * half                                                  # (..., 8, 3)
    c, s = boxes[..., 6:7].cos(), boxes[..., 6:7].sin()
    x = c * local[..., 0] - s * local[..., 1]
    y = s * local[..., 0] + c * local[..., 1]
    return torch.stack([x, y, local[..., 2]], -1) + boxes[..., None, :3]


class Fourier(nn.Module):
    """x (..., C) -> (..., C * (1 + 2F)): x, sin(2^k pi x), cos(2^k pi x), k < F (NeRF style)."""

    def __init__(self, num_freqs: int):
        super().__init__()
        self.register_buffer("freqs", (2.0 ** torch.arange(num_freqs)) * math.pi, persistent=False)

    def out_dim(self, c: int) -> int:
        return c * (1 + 2 * len(self.freqs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ang = x[..., None] * self.freqs.to(x)                                    # (..., C, F)
        return torch.cat([x[..., None], ang.sin(), ang.cos()], -1).flatten(-2)


def latent_groups(x: torch.Tensor, group: int = 4) -> torch.Tensor:
    """(B, T, ...) -> (B, T', group, ...): pixel frames of each latent frame (frame 0 alone, then
    groups of `group`). Frame 0's group is left-padded with copies of frame 0, as CogVAE's causal
    convolutions replicate-pad it, so a static signal gives the same group at every latent frame."""
    B, T = x.shape[:2]
    if (T - 1) % group:
        raise ValueError(f"{T} frames: CogVAE grouping needs 1 + {group}k frames")
    x = torch.cat([x[:, :1].expand(B, group - 1, *x.shape[2:]), x], 1)
    return x.reshape(B, (T - 1) // group + 1, group, *x.shape[2:])


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t (B,) in [0, 1] -> (B, D). Scaled by 1000 so the usual DiT frequency range applies."""
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        ang = (t.float() * 1000.0)[:, None] * freqs[None]
        return self.mlp(torch.cat([ang.cos(), ang.sin()], -1).to(self.mlp[0].weight.dtype))


class CameraEmbedder(nn.Module):
    """Camera token per view and latent frame from intrinsics (normalised by the image size, so
    one embedding serves every bucket) and the per-frame camera->LiDAR(t) rotation and
    translation: one token per pixel frame, then the 4 tokens of each CogVAE group are
    concatenated and merged by a linear map initialised to their average (so a static rig
    starts with the same token in every latent frame, and within-group motion stays learnable)."""

    def __init__(self, dim: int, num_freqs: int, group: int = 4):
        super().__init__()
        self.group = group
        self.fourier = Fourier(num_freqs)
        self.mlp = Mlp(self.fourier.out_dim(4 + 9 + 3), dim, dim)
        self.merge = nn.Linear(group * dim, dim)

    def init_average(self) -> None:
        D = self.merge.out_features
        with torch.no_grad():
            self.merge.weight.copy_(torch.eye(D).repeat(1, self.group) / self.group)
            self.merge.bias.zero_()

    def forward(self, intrinsics: torch.Tensor, cam2lidar: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """intrinsics (B, V, 3, 3), cam2lidar (B, T, V, 4, 4), image size in pixels -> (B, V, T', D)."""
        T = cam2lidar.shape[1]
        k = torch.stack([intrinsics[..., 0, 0] / width, intrinsics[..., 1, 1] / height,
                         intrinsics[..., 0, 2] / width, intrinsics[..., 1, 2] / height], -1)   # (B, V, 4)
        k = k[:, None].expand(-1, T, -1, -1)                                                   # (B, T, V, 4)
        feats = torch.cat([k, cam2lidar[..., :3, :3].flatten(-2), cam2lidar[..., :3, 3] / METRIC_SCALE], -1)
        tok = latent_groups(self.mlp(self.fourier(feats)), self.group)                        # (B, T', G, V, D)
        return self.merge(tok.permute(0, 3, 1, 2, 4).flatten(-2))                             # (B, V, T', D)


class SpatialTemporalEncoder(nn.Module):
    """Per-track tokens (B, T, N, D) -> (B, T', N, D) aligned with CogVAE's causal temporal
    compression (paper Fig. 4b): a temporal transformer with RoPE (positions = pixel frame
    index) relates each track's frames over the whole clip, then the 4 frame slots of each
    CogVAE group are concatenated and projected (a learned downsampling that keeps per-frame
    order, unlike a pool-and-repeat). Frame 0 owns latent 0 alone: its group is left-padded
    with G-1 absent slots, as the causal VAE pads it. Absent frames (mask False) are zeroed
    and excluded from attention.

    Attention is causal (frame i sees frames <= i), like CogVAE itself, whose latent k depends
    on pixel frames <= 4k only. So latent k's token depends on frames <= 4k: the tokens of a
    clip's prefix are the prefix of the clip's tokens, whatever its length, which keeps the
    trainer's common-prefix crop and the sampler's length change consistent with training."""

    def __init__(self, dim: int, heads: int, layers: int, group: int = 4):
        super().__init__()
        self.group = group
        self.heads = heads
        self.norms = nn.ModuleList(nn.LayerNorm(dim, eps=1e-6) for _ in range(2 * layers))
        self.attns = nn.ModuleList(Attention(dim, heads) for _ in range(layers))
        self.mlps = nn.ModuleList(Mlp(dim, 4 * dim) for _ in range(layers))
        self.merge = nn.Linear(group * dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, N, D), mask (B, T, N) bool -> tokens (B, T', N, D), mask (B, T', N)."""
        B, T, N, D = x.shape
        G = self.group
        if (T - 1) % G:
            raise ValueError(f"{T} frames: the spatial-temporal encoder needs 1 + {G}k frames")
        Tl = (T - 1) // G + 1
        if N == 0:   # a clip without objects: nothing to encode (reshapes of empty tensors are ambiguous)
            return self.merge(x.new_zeros(B, Tl, 0, G * D)), mask.new_zeros(B, Tl, 0)
        L = Tl * G
        x = torch.cat([x.new_zeros(B, G - 1, N, D), x * mask[..., None]], 1).transpose(1, 2)  # (B, N, L, D)
        m = torch.cat([mask.new_zeros(B, G - 1, N), mask], 1).transpose(1, 2)               # (B, N, L)
        pos = torch.arange(L, device=x.device, dtype=torch.float32) - (G - 1)                # pixel frame index
        cos, sin = rope_cos_sin(pos, D // self.heads)
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        eye = torch.eye(L, dtype=torch.bool, device=x.device)
        attn_mask = ((m[..., None, :] & causal) | eye)[:, :, None]  # (B, N, 1, L, L); self always allowed
        for i, (attn, mlp) in enumerate(zip(self.attns, self.mlps)):
            x = x + attn(self.norms[2 * i](x), mask=attn_mask, rope=(cos, sin))
            x = x + mlp(self.norms[2 * i + 1](x))
            x = x * m[..., None]
        out = self.merge(x.reshape(B, N, Tl, G * D)).transpose(1, 2)                        # (B, T', N, D)
        return out, m.reshape(B, N, Tl, G).any(-1).transpose(1, 2)


class BoxEmbedder(nn.Module):
    def __init__(self, dim: int, heads: int, layers: int, num_classes: int, num_freqs: int):
        super().__init__()
        self.fourier = Fourier(num_freqs)
        self.mlp = Mlp(self.fourier.out_dim(8 * 3), dim, dim)
        self.cls = nn.Embedding(num_classes, dim)
        self.st = SpatialTemporalEncoder(dim, heads, layers)

    def forward(self, view_boxes: torch.Tensor, box_class: torch.Tensor, box_mask: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """view_boxes (B, T, V, N, 7), box_class (B, N), box_mask (B, T, V, N): view v has a box for
        object n in frame t (or (B, T, N): the same for every view)
        -> (B, T', V, N, D), (B, T', V, N). Each (view, object) is its own track, so view v's
        tokens depend on view v's boxes only."""
        B, T, V, N, _ = view_boxes.shape
        mask = (box_mask[:, :, None] if box_mask.dim() == 3 else box_mask).expand(B, T, V, N)
        # padded slots may hold anything (even NaN): replace before any arithmetic touches them
        boxes = torch.where(mask[..., None], view_boxes, torch.zeros_like(view_boxes))
        corners = box_corners(boxes) / METRIC_SCALE                                 # (B, T, V, N, 8, 3)
        tok = self.mlp(self.fourier(corners.flatten(-2))) + self.cls(box_class.clamp(min=0))[:, None, None]
        out, m = self.st(tok.flatten(2, 3), mask.flatten(2, 3))                     # (B, T', V*N, D)
        return out.unflatten(2, (V, N)), m.unflatten(2, (V, N))


class TrajEmbedder(nn.Module):
    """Ego poses LiDAR(t) -> LiDAR(0): one track (N = 1) through the spatial-temporal encoder."""

    def __init__(self, dim: int, heads: int, layers: int, num_freqs: int):
        super().__init__()
        self.fourier = Fourier(num_freqs)
        self.mlp = Mlp(self.fourier.out_dim(12), dim, dim)
        self.st = SpatialTemporalEncoder(dim, heads, layers)

    def forward(self, traj: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """traj (B, T, 4, 4), keep (B, T) bool (False: that frame's pose is masked) -> (B, T', D)."""
        feats = torch.cat([traj[..., :3, :3].flatten(-2), traj[..., :3, 3] / METRIC_SCALE], -1)  # (B, T, 12)
        tok = self.mlp(self.fourier(feats))[:, :, None]                                    # (B, T, 1, D)
        mask = torch.ones(tok.shape[:3], dtype=torch.bool, device=tok.device) if keep is None else keep[:, :, None]
        return self.st(tok, mask)[0][:, :, 0]


class TextProjection(nn.Module):
    """T5 states (B, L, D_text) -> (B, L, D) (Open-Sora's caption embedder MLP)."""

    def __init__(self, text_dim: int, dim: int):
        super().__init__()
        self.mlp = Mlp(text_dim, dim, dim)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.mlp(text.to(self.mlp.fc1.weight.dtype))


def rays_lidar(intrinsics: torch.Tensor, cam2lidar: torch.Tensor, h: int, w: int, stride: int) -> torch.Tensor:
    """Unit ray directions (in LiDAR(t) axes) through the centres of an h x w token grid whose
    cells are `stride` pixels, per latent frame: (B, V, 3, 3), (B, T, V, 4, 4) -> (B, V, T', h*w, 3).
    A latent frame's ray is the normalised mean of its pixel frames' rays (CogVAE groups); the
    mean is taken over the rotations, which is the same thing since K is per view."""
    dev = intrinsics.device
    v, u = torch.meshgrid((torch.arange(h, device=dev) + 0.5) * stride,
                          (torch.arange(w, device=dev) + 0.5) * stride, indexing="ij")
    pix = torch.stack([u, v, torch.ones_like(u)], -1).reshape(-1, 3).to(intrinsics)     # (S, 3)
    d_cam = torch.einsum("bvij,sj->bvsi", torch.linalg.inv(intrinsics.float()).to(intrinsics), pix)
    rot = latent_groups(cam2lidar[..., :3, :3]).mean(2)                                   # (B, T', V, 3, 3)
    d = torch.einsum("btvij,bvsj->bvtsi", rot, d_cam)
    return F.normalize(d, dim=-1)
