"""Transformer pieces of MVDiT: attention (SDPA), RoPE, sincos positions, the STDiT-3 block
with adaLN-single modulation, the cross-view attention layer and the final layer.

Token layout inside the backbone: x is (B, V, T', S, D) with S = h * w spatial tokens
(h, w = padded latent size / 2). Each op reshapes to the axis it attends over.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


# ---- positions -------------------------------------------------------------------------

def rope_cos_sin(pos: torch.Tensor, dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """pos (..., L) float -> cos, sin (..., L, dim) for rotate-half RoPE (dim even)."""
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, device=pos.device, dtype=torch.float32) / dim))
    ang = pos.float()[..., None] * inv                                  # (..., L, dim/2)
    ang = torch.cat([ang, ang], -1)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., L, d); cos/sin broadcastable (..., L, d)."""
    x1, x2 = x.chunk(2, -1)
    rot = torch.cat([-x2, x1], -1)
    return (x.float() * cos + rot.float() * sin).to(x.dtype)


def sincos_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """pos (L,) float -> (L, dim) sin/cos features (dim even)."""
    omega = 1.0 / (10000 ** (torch.arange(dim // 2, device=pos.device, dtype=torch.float32) / (dim / 2)))
    out = pos.float()[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], -1)


def sincos_2d(h: int, w: int, dim: int, base: float, device=None) -> torch.Tensor:
    """(h*w, dim) spatial embedding whose coordinates are rescaled to a fixed reference token
    count (base x base): a larger bucket interpolates between trained positions instead of
    extrapolating to unseen ones (the Open-Sora 1.2 trick), aspect ratio preserved."""
    scale = base / math.sqrt(h * w)
    gy = torch.arange(h, device=device, dtype=torch.float32) * scale
    gx = torch.arange(w, device=device, dtype=torch.float32) * scale
    ey, ex = sincos_1d(gy, dim // 2), sincos_1d(gx, dim // 2)       # (h, d/2), (w, d/2)
    return torch.cat([ey[:, None].expand(h, w, -1), ex[None].expand(h, w, -1)], -1).reshape(h * w, dim)


# ---- attention --------------------------------------------------------------------------

def _rms(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """RMS-norm in x's dtype (under bf16 autocast q/k are bf16 while the weight is fp32,
    which would otherwise fall off the fused kernel)."""
    if isinstance(norm, nn.RMSNorm):
        return F.rms_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), norm.eps)
    return x


class Attention(nn.Module):
    """Multi-head attention through F.scaled_dot_product_attention with q/k RMS-norm (stabilises
    bf16 training as in Open-Sora 1.2) and optional RoPE on q and k."""

    sequence_parallel = None  # model/parallel.py sets it on spatial and cross-view attention

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, qk_norm: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(kv_dim or dim, 2 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (..., Lq, D); ctx (..., Lk, Dk) (self-attention if None); mask broadcastable to
        (..., 1, Lq, Lk) bool (True = attend); rope cos/sin (Lq, d) used for q and k (self-attn)."""
        ctx = x if ctx is None else ctx
        *lead, lq, _ = x.shape
        lk = ctx.shape[-2]
        q = self.q(x).view(*lead, lq, self.heads, self.head_dim).transpose(-2, -3)        # (..., h, Lq, d)
        k, v = self.kv(ctx).view(*ctx.shape[:-2], lk, 2, self.heads, self.head_dim).unbind(-3)
        k, v = k.transpose(-2, -3), v.transpose(-2, -3)                                  # (..., h, Lk, d)
        q, k = _rms(self.q_norm, q), _rms(self.k_norm, k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # fused SDPA kernels want 4-D (N, h, L, d): fold the leading axes (keys broadcast if needed)
        h, d = self.heads, self.head_dim
        q = q.reshape(-1, h, lq, d)
        k = k.expand(*lead, h, lk, d).reshape(-1, h, lk, d)
        v = v.expand(*lead, h, lk, d).reshape(-1, h, lk, d)
        if mask is not None:
            mask = mask.expand(*lead, *mask.shape[-3:]).reshape(-1, *mask.shape[-3:])
        if self.sequence_parallel is not None:   # tokens split over ranks: all-to-all over heads
            out = self.sequence_parallel.attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)               # (N, h, Lq, d)
        return self.proj(out.view(*lead, h, lq, d).transpose(-2, -3).reshape(*lead, lq, -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


# ---- blocks -----------------------------------------------------------------------------

class CrossViewAttention(nn.Module):
    """Each view's tokens attend to the tokens of other views at the same latent frame.
    mode "ring": the two neighbours in the camera ring (MagicDrive; nuScenes views overlap only
    with their neighbours, and it costs 2x a spatial attention instead of Vx); "all": every view.
    The update is scaled by a per-channel gate that starts at zero, so a fresh block is an
    identity like every other adaLN-zero branch (and adding the layer to a trained model is too)."""

    def __init__(self, dim: int, heads: int, mode: str = "ring"):
        super().__init__()
        if mode not in ("ring", "all"):
            raise ValueError(f"cross_view mode {mode!r}: use 'ring' or 'all'")
        self.mode = mode
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, V, T', S, D) -> residual update, same shape."""
        B, V, T, S, D = x.shape
        h = self.norm(x)
        if self.mode == "ring":
            ctx = torch.cat([h.roll(1, dims=1), h.roll(-1, dims=1)], dim=3)            # (B, V, T', 2S, D)
        else:
            ctx = h.permute(0, 2, 1, 3, 4).reshape(B, 1, T, V * S, D).expand(B, V, T, V * S, D)
        return self.gate.to(x.dtype) * self.attn(h, ctx)


class STDiTBlock(nn.Module):
    """One STDiT-3 block (Open-Sora 1.2): self-attention over space (spatial block, followed by
    cross-view attention: the MVDiT block) or over time (temporal block, RoPE), cross-attention
    to the per-(view, frame) condition tokens, MLP; adaLN-single: the shared timestep projection
    t0 (B, 6D) plus this block's learned table gives shift/scale/gate for attention and MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, temporal: bool, cross_view: str | None):
        super().__init__()
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(dim, heads)
        self.cross_view = CrossViewAttention(dim, heads, cross_view) if (cross_view and not temporal) else None
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.zeros(6, dim))

    def forward(self, x: torch.Tensor, t0: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor,
                rope_t: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x (B, V, T', S, D); t0 (B, 6, D); cond (B, V, T', Lc, D) keys of each view and latent
        frame (each view sees its own boxes and camera); cond_mask (B, V, T', Lc) bool; rope_t
        cos/sin (T', d_head)."""
        B, V, T, S, D = x.shape
        mod = (self.scale_shift_table[None] + t0)[:, None, None, None]                  # (B,1,1,1,6,D)
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = mod.unbind(-2)
        h = modulate(self.norm1(x), sh_a, sc_a)
        if self.temporal:
            h = h.permute(0, 1, 3, 2, 4)                                                # (B, V, S, T', D)
            h = self.attn(h, rope=rope_t).permute(0, 1, 3, 2, 4)
        else:
            h = self.attn(h)
        x = x + g_a * h
        if self.cross_view is not None:
            x = x + self.cross_view(x)
        x = x + self.cross_attn(self.norm_cross(x), cond, mask=cond_mask[:, :, :, None, None, :])
        x = x + g_m * self.mlp(modulate(self.norm2(x), sh_m, sc_m))
        return x


class FinalLayer(nn.Module):
    """adaLN-single output head (PixArt/Open-Sora T2IFinalLayer): tokens -> patch values."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(dim, out_dim)
        self.scale_shift_table = nn.Parameter(torch.zeros(2, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x (B, V, T', S, D); t (B, D)."""
        shift, scale = (self.scale_shift_table[None] + t[:, None])[:, None, None, None].unbind(-2)
        return self.linear(modulate(self.norm(x), shift, scale))
