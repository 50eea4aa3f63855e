"""Condition encoders of MVDiT (paper Sections 4.2-4.3, Figure 4).

- timestep: sinusoidal features of 1000 * t -> MLP (t is the rectified-flow time in [0, 1]);
- text: MLP projection of T5 encoder states;
- camera: MLP on Fourier features of (K normalised by the image size, R, t) -> one token per view;
- boxes: per-frame MLP on Fourier features of the 8 corners + class embedding, then the
  spatial-temporal encoder: a temporal transformer with RoPE inside each CogVAE group (first
  frame alone, then groups of 4) and a learned merge of each group into one latent frame,
  so T -> T' = (T - 1) // 4 + 1 without reduce-and-repeat (the paper's "4x down");
- trajectory: the same spatial-temporal encoder with an MLP on the ego poses.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.blocks import Attention, Mlp, rope_cos_sin

# Corner order of pipeline.geometry.box_corners: bottom face (z-) then top face (z+), each
# (+l,+w), (+l,-w), (-l,-w), (-l,+w) in the box frame (x along the heading).
_CORNER_SIGNS = torch.tensor([[sx, sy, sz] for sz in (-1, 1) for sx, sy in ((1, 1), (1, -1), (-1, -1), (-1, 1))],
                             dtype=torch.float32)  # (8, 3)
METRIC_SCALE = 50.0  # metres -> ~unit range (BEV half extent) before Fourier features


def box_corners(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 7) x y z w l h yaw -> (..., 8, 3) corners; torch twin of pipeline.geometry.box_corners."""
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
    """Per-view camera token from intrinsics (normalised by the image size, so one embedding
    serves every bucket) and camera->LiDAR rotation and translation."""

    def __init__(self, dim: int, num_freqs: int):
        super().__init__()
        self.fourier = Fourier(num_freqs)
        self.mlp = Mlp(self.fourier.out_dim(4 + 9 + 3), dim, dim)

    def forward(self, intrinsics: torch.Tensor, cam2lidar: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """intrinsics (B, V, 3, 3), cam2lidar (B, V, 4, 4), image size in pixels -> (B, V, D)."""
        k = torch.stack([intrinsics[..., 0, 0] / width, intrinsics[..., 1, 1] / height,
                         intrinsics[..., 0, 2] / width, intrinsics[..., 1, 2] / height], -1)   # (B, V, 4)
        feats = torch.cat([k, cam2lidar[..., :3, :3].flatten(-2), cam2lidar[..., :3, 3] / METRIC_SCALE], -1)
        return self.mlp(self.fourier(feats))


class SpatialTemporalEncoder(nn.Module):
    """Per-track tokens (B, T, N, D) -> (B, T', N, D) aligned with CogVAE's causal temporal
    compression: latent frame 0 sees pixel frame 0 only, latent k >= 1 sees frames 4k-3..4k.
    A temporal transformer with RoPE mixes the frames of each group (attention never crosses a
    group, so each latent frame depends only on its own frames); the group's 4 frame slots are
    concatenated and projected (a learned downsampling that keeps per-frame order, unlike a
    pool-and-repeat). Absent frames (mask False) are zeroed and excluded from attention."""

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
        x = x * mask[..., None]
        # first frame alone: left-pad its group with G-1 absent slots (the causal VAE pads the
        # first frame the same way), so every latent frame owns exactly G slots
        x = torch.cat([x.new_zeros(B, G - 1, N, D), x], 1).view(B, Tl, G, N, D).permute(0, 1, 3, 2, 4)
        m = torch.cat([mask.new_zeros(B, G - 1, N), mask], 1).view(B, Tl, G, N).permute(0, 1, 3, 2)
        # (B, T', N, G, D), (B, T', N, G); positions = pixel frame index for RoPE
        cos, sin = rope_cos_sin(torch.arange(G, device=x.device, dtype=torch.float32), D // self.heads)
        eye = torch.eye(G, dtype=torch.bool, device=x.device)
        attn_mask = (m[..., None, :] | eye)[..., None, :, :]        # (B, T', N, 1, G, G); self always allowed
        for i, (attn, mlp) in enumerate(zip(self.attns, self.mlps)):
            x = x + attn(self.norms[2 * i](x), mask=attn_mask, rope=(cos, sin))
            x = x + mlp(self.norms[2 * i + 1](x))
            x = x * m[..., None]
        out = self.merge(x.flatten(-2))                             # (B, T', N, D)
        return out, m.any(-1)


class BoxEmbedder(nn.Module):
    def __init__(self, dim: int, heads: int, layers: int, num_classes: int, num_freqs: int):
        super().__init__()
        self.fourier = Fourier(num_freqs)
        self.mlp = Mlp(self.fourier.out_dim(8 * 3), dim, dim)
        self.cls = nn.Embedding(num_classes, dim)
        self.st = SpatialTemporalEncoder(dim, heads, layers)

    def forward(self, boxes: torch.Tensor, box_class: torch.Tensor, box_mask: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """boxes (B, T, N, 7), box_class (B, N), box_mask (B, T, N) -> (B, T', N, D), (B, T', N)."""
        # padded slots may hold anything (even NaN): replace before any arithmetic touches them
        boxes = torch.where(box_mask[..., None], boxes, torch.zeros_like(boxes))
        corners = box_corners(boxes) / METRIC_SCALE                                 # (B, T, N, 8, 3)
        tok = self.mlp(self.fourier(corners.flatten(-2))) + self.cls(box_class.clamp(min=0))[:, None]
        return self.st(tok, box_mask)


class TrajEmbedder(nn.Module):
    """Ego poses LiDAR(t) -> LiDAR(0): one track (N = 1) through the spatial-temporal encoder."""

    def __init__(self, dim: int, heads: int, layers: int, num_freqs: int):
        super().__init__()
        self.fourier = Fourier(num_freqs)
        self.mlp = Mlp(self.fourier.out_dim(12), dim, dim)
        self.st = SpatialTemporalEncoder(dim, heads, layers)

    def forward(self, traj: torch.Tensor) -> torch.Tensor:
        """traj (B, T, 4, 4) -> (B, T', D)."""
        feats = torch.cat([traj[..., :3, :3].flatten(-2), traj[..., :3, 3] / METRIC_SCALE], -1)  # (B, T, 12)
        tok = self.mlp(self.fourier(feats))[:, :, None]                                    # (B, T, 1, D)
        mask = torch.ones(tok.shape[:3], dtype=torch.bool, device=tok.device)
        return self.st(tok, mask)[0][:, :, 0]


class TextProjection(nn.Module):
    """T5 states (B, L, D_text) -> (B, L, D) (Open-Sora's caption embedder MLP)."""

    def __init__(self, text_dim: int, dim: int):
        super().__init__()
        self.mlp = Mlp(text_dim, dim, dim)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.mlp(text.to(self.mlp.fc1.weight.dtype))


def rays_lidar(intrinsics: torch.Tensor, cam2lidar: torch.Tensor, h: int, w: int, stride: int) -> torch.Tensor:
    """Unit ray directions (in LiDAR axes) through the centres of an h x w token grid whose cells
    are `stride` pixels: (B, V, 3, 3), (B, V, 4, 4) -> (B, V, h*w, 3)."""
    dev = intrinsics.device
    v, u = torch.meshgrid((torch.arange(h, device=dev) + 0.5) * stride,
                          (torch.arange(w, device=dev) + 0.5) * stride, indexing="ij")
    pix = torch.stack([u, v, torch.ones_like(u)], -1).reshape(-1, 3).to(intrinsics)     # (S, 3)
    d_cam = torch.einsum("bvij,sj->bvsi", torch.linalg.inv(intrinsics.float()).to(intrinsics), pix)
    d = torch.einsum("bvij,bvsj->bvsi", cam2lidar[..., :3, :3], d_cam)
    return F.normalize(d, dim=-1)
