"""Condition encoders of MVDiT, twins of the authors' (magicdrivedit/models/magicdrive/embedder.py):

- camera (CamEmbedder): [K | R | t] (3 x 7) of a camera, each of the 7 columns through Fourier
  features (x, sin 2^k x, cos 2^k x; k < 4; no pi), concatenated -> linear -> zero-init after_proj;
  a dropped camera is replaced by the learned `uncond_cam` (3 x 7) before embedding;
- ego pose (CamEmbedderTemp, `frame_embedder`): the 3 x 4 [R | t] of LiDAR(0) -> LiDAR(t) per
  pixel frame, embedded the same way (dropped frames -> `uncond_cam` 3 x 4), then one temporal
  transformer layer over the T frames (RoPE, q/k RMS-norm, its own constant scale_shift_table),
  zero-init final_proj, and T -> T' by two CogVideoX temporal downsamplings (cog_temp_down);
- boxes (ContinuousBBoxWithTextTempEmbedding, `bbox_embedder`): the 8 corners through Fourier
  features -> bbox_proj, SiLU, concatenated with the class token (frozen T5 + y_proj embedding of
  the class name, plus a per-class N(mu, sigma) draw of a per-box latent) -> second_linear; padded
  boxes take the learned null features, masked boxes the learned mask features; then the same
  temporal layer per box track, final_proj and T -> T'.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.layers import Attention, Mlp, RotaryEmbedding, layer_norm, modulate

# Corner order of the authors' boxes (mmdet3d LiDARInstance3DBoxes.corners with their SECOND-style
# box: x_size = w, y_size = l, yaw_box = -yaw - pi/2): unit corners (a, b, c) in this order map to
# centre + (a - 1/2) w left + (b - 1/2) l back + c h up, left/back relative to the heading.
_CORNER_UNITS = ((0, 0, 0), (0, 0, 1), (0, 1, 1), (0, 1, 0), (1, 0, 0), (1, 0, 1), (1, 1, 1), (1, 1, 0))


def box_corners_authors(boxes: torch.Tensor, lifted: bool = True) -> torch.Tensor:
    """(..., 7) x y z w l h yaw (centre, schema convention) -> (..., 8, 3) in the authors' corner order.

    lifted=True reproduces their data: their box tensor holds the nuScenes centre but is read as
    the bottom centre (origin (0.5, 0.5, 0)), so every corner sits h/2 higher than the object;
    the released weights were trained on those. lifted=False gives the real corners."""
    u = torch.tensor(_CORNER_UNITS, dtype=boxes.dtype, device=boxes.device)             # (8, 3)
    c, s = boxes[..., 6].cos(), boxes[..., 6].sin()
    left = torch.stack([-s, c], -1)[..., None, :]                                         # (..., 1, 2)
    back = torch.stack([-c, -s], -1)[..., None, :]
    a = (u[:, 0] - 0.5)[:, None] * boxes[..., None, 3:4]                                  # (..., 8, 1) x w
    b = (u[:, 1] - 0.5)[:, None] * boxes[..., None, 4:5]
    z = (u[:, 2] - (0.0 if lifted else 0.5))[:, None] * boxes[..., None, 5:6]
    xy = a * left + b * back
    return torch.cat([xy, z], -1) + boxes[..., None, :3]


def cog_temp_down(x: torch.Tensor) -> torch.Tensor:
    """(B, T, N, D) -> (B, ceil-ish T/2, N, D): CogVideoX's time downsampling; an odd T keeps frame
    0 and averages the following pairs, an even T averages pairs."""
    if x.shape[1] % 2:
        if x.shape[1] == 1:
            return x
        first, rest = x[:, :1], x[:, 1:]
        return torch.cat([first, rest.unflatten(1, (-1, 2)).mean(2)], 1)
    return x.unflatten(1, (-1, 2)).mean(2)


def time_down(x: torch.Tensor, mode: str) -> torch.Tensor:
    """T pixel frames -> latent frames: "cog" twice-halved (T = 4k + 1 -> k + 1), "mean" -> 1."""
    if mode == "mean":
        return x.mean(1, keepdim=True)
    return cog_temp_down(cog_temp_down(x))


class Fourier(nn.Module):
    """x (..., d) -> (..., d (1 + 2F)): [x, sin(2^0 x), cos(2^0 x), sin(2^1 x), cos(2^1 x), ...]."""

    def __init__(self, num_freqs: int):
        super().__init__()
        self.bands = [2.0 ** k for k in range(num_freqs)]   # exact powers of two, as theirs

    def out_dim(self, d: int) -> int:
        return d * (1 + 2 * len(self.bands))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [x]
        for f in self.bands:
            parts += [torch.sin(x * f), torch.cos(x * f)]
        return torch.cat(parts, -1)


def add_temporal_layer(m: nn.Module, dim: int, heads: int, causal: bool) -> None:
    """The single temporal transformer layer the authors' box and ego-pose encoders share
    (attributes set on the encoder itself: their keys are `<encoder>.attn.*`, `<encoder>.mlp.*`)."""
    m.rope = RotaryEmbedding(dim // heads)
    m.norm1 = layer_norm(dim)
    m.attn = Attention(dim, heads, qkv_bias=True, qk_norm=True, rope=m.rope, causal=causal)
    m.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim ** 0.5)
    m.norm2 = layer_norm(dim)
    m.mlp = Mlp(dim, 4 * dim)
    m.final_proj = nn.Linear(dim, dim)


def temporal_layer(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x (N, T, D) -> (N, T, D): attention over T and an MLP, modulated by the constant table."""
    sh, sc, g, sh_m, sc_m, g_m = m.scale_shift_table[None].chunk(6, dim=1)
    x = x + g * m.attn(modulate(m.norm1(x), sh, sc))
    return x + g_m * m.mlp(modulate(m.norm2(x), sh_m, sc_m))


class CamEmbedder(nn.Module):
    """(N, 3 or 4, num) camera / pose matrices -> (N, D) tokens."""

    def __init__(self, dim: int, num: int, num_freqs: int):
        super().__init__()
        self.fourier = Fourier(num_freqs)
        self.emb2token = nn.Linear(self.fourier.out_dim(3) * num, dim)
        self.uncond_cam = nn.Parameter(torch.randn(3, num))
        self.after_proj = nn.Linear(dim, dim)

    def tokens(self, param: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        param = param[:, :3]                                                       # (N, 3, num)
        param = torch.where(keep[:, None, None], param, self.uncond_cam[None].to(param.dtype))
        emb = self.fourier(param.transpose(1, 2))                                  # (N, num, 27)
        return self.emb2token(emb.flatten(1))

    def forward(self, param: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """param (N, 3, 7) [K | cam->LiDAR 3x4]; keep (N,) bool -> (N, D)."""
        return self.after_proj(self.tokens(param, keep))


class FrameEmbedder(CamEmbedder):
    """Ego poses (their CamEmbedderTemp): (N, T, 4, 4) LiDAR(0) -> LiDAR(t) -> (N, T', D)."""

    def __init__(self, dim: int, heads: int, num_freqs: int, time: str, causal: bool = False):
        super().__init__(dim, 4, num_freqs)
        del self.after_proj      # theirs: after_proj=False in the parent, final_proj after the temporal layer
        self.time = time
        add_temporal_layer(self, dim, heads, causal)

    def forward(self, rel_pos: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """rel_pos (N, T, 4 or 3, 4); keep (N, T) bool -> (N, T', D)."""
        N, T = rel_pos.shape[:2]
        tok = self.tokens(rel_pos.flatten(0, 1), keep.flatten()).view(N, T, -1)
        tok = self.final_proj(temporal_layer(self, tok))
        return time_down(tok[:, :, None], self.time)[:, :, 0]


class BoxEmbedder(nn.Module):
    """Boxes per (view-batch, frame, slot) -> tokens (N, T', M, D) (their ContinuousBBoxWithTextTempEmbedding)."""

    def __init__(self, dim: int, num_classes: int, mid: int, heads: int, num_freqs: int, sample_id: bool,
                 time: str, causal: bool = False):
        super().__init__()
        self.fourier = Fourier(num_freqs)
        pos_dim = self.fourier.out_dim(3) * 8
        self.bbox_proj = nn.Linear(pos_dim, dim)
        self.second_linear = nn.Sequential(nn.Linear(2 * dim, mid), nn.SiLU(), nn.Linear(mid, mid), nn.SiLU(),
                                           nn.Linear(mid, dim))
        # frozen class tokens: T5 + y_proj embedding of each class name (model.text.class_tokens)
        self.register_buffer("_class_tokens", torch.randn(num_classes, dim))
        self.mean_var = nn.Parameter(torch.randn(num_classes, 2)) if sample_id else None
        self.null_class_feature = nn.Parameter(torch.zeros(dim))
        self.null_pos_feature = nn.Parameter(torch.zeros(pos_dim))
        self.mask_class_feature = nn.Parameter(torch.zeros(dim))
        self.mask_pos_feature = nn.Parameter(torch.zeros(pos_dim))
        self.time = time
        add_temporal_layer(self, dim, heads, causal)

    @property
    def latent_dim(self) -> int:
        return self._class_tokens.shape[1]

    def forward(self, corners: torch.Tensor, classes: torch.Tensor, null: torch.Tensor, keep: torch.Tensor,
                box_latent: torch.Tensor | None) -> torch.Tensor:
        """corners (N, T, M, 8, 3); classes (N, T, M) int (-1 = padding); null (N, T, M) 1 = a box,
        0 = null (padding); keep (N, T, M) 1 = shown, 0 = masked; box_latent (N, T, M, D) or None."""
        N, T, M = classes.shape
        dt = self.null_pos_feature.dtype
        null = null.to(dt)[..., None]
        keep = keep.to(dt)[..., None]
        pos = self.fourier(corners).flatten(-2).to(dt)                                  # (N, T, M, 216)
        pos = pos * null + self.null_pos_feature * (1 - null)
        pos = pos * keep + self.mask_pos_feature * (1 - keep)
        cls_id = classes.long() % self._class_tokens.shape[0]                            # -1 -> last, as theirs
        cls = self._class_tokens[cls_id]
        if self.mean_var is not None:
            mu, logvar = self.mean_var[cls_id].unbind(-1)
            if box_latent is None:
                box_latent = torch.randn_like(cls)
            cls = cls + (box_latent.to(cls.dtype) * torch.exp(0.5 * logvar)[..., None] + mu[..., None])
        cls = cls * null + self.null_class_feature * (1 - null)
        cls = cls * keep + self.mask_class_feature * (1 - keep)
        emb = self.second_linear(torch.cat([F.silu(self.bbox_proj(pos)), cls], -1))     # (N, T, M, D)
        tracks = emb.transpose(1, 2).reshape(N * M, T, -1)
        x = temporal_layer(self, tracks).view(N, M, T, -1).transpose(1, 2)
        return time_down(self.final_proj(x), self.time)                                 # (N, T', M, D)
