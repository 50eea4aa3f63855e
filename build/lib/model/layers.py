"""The primitives of MVDiT, each the twin of a layer of the authors' MagicDriveSTDiT3 (same
parameters, same names, same arithmetic order where it changes rounding): RMS-norm, MLP,
rotary embedding, the three attentions, patch and timestep embedders, the caption embedder,
the 2-D sincos positions and the adaLN-single output head.

Attention runs through F.scaled_dot_product_attention (the same softmax(q k^T / sqrt(d)) v as
their plain-torch path, to float rounding); inside `with reference_attention():` it runs their
plain-torch arithmetic itself (q * scale @ k^T, softmax in fp32, @ v), and the network's output
is then theirs to the bit (tests/test_interop_magicdrivedit.py). `sequence_parallel` is the
model/parallel.py hook.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn


_REFERENCE = [False]


@contextlib.contextmanager
def reference_attention(enabled: bool = True):
    """Attention by the authors' plain-torch path instead of SDPA while inside (slower, materialises
    the attention matrix): for exact comparisons with their outputs, not for training."""
    old, _REFERENCE[0] = _REFERENCE[0], enabled
    try:
        yield
    finally:
        _REFERENCE[0] = old


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """q (N, h, L, d), k and v (N, h, Lk, d) -> (N, h, L, d)."""
    if not _REFERENCE[0]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    a = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    a = a.float()
    if causal:
        a = a.masked_fill(~torch.ones(a.shape[-2:], dtype=torch.bool, device=a.device).tril(), float("-inf"))
    return a.softmax(-1).to(q.dtype) @ v


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation (their t2i_modulate)."""
    return x * (1 + scale) + shift


def layer_norm(dim: int) -> nn.LayerNorm:
    """The blocks' parameter-free LayerNorm (elementwise_affine=False, eps 1e-6)."""
    return nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)


class RMSNorm(nn.Module):
    """RMS-norm computed in fp32, cast back, then scaled (LlamaRMSNorm / T5LayerNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Mlp(nn.Module):
    """fc1 -> GELU (tanh) -> fc2 (timm's Mlp with approx_gelu)."""

    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class RotaryEmbedding(nn.Module):
    """RoPE over the sequence axis (-2) with interleaved pairs (rotary_embedding_torch's
    RotaryEmbedding(dim), freqs_for='lang', theta 10000): channel pair (2i, 2i+1) turns by
    position x 10000^(-2i/dim). `freqs` is kept in the state dict, as theirs (`*.rope.freqs`)."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        self.register_buffer("freqs", 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim)))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t (..., L, d) -> rotated, same shape (promoted to fp32 like theirs under autocast)."""
        pos = torch.arange(t.shape[-2], device=t.device, dtype=t.dtype).to(self.freqs.dtype)
        ang = (pos[:, None] * self.freqs[None]).repeat_interleave(2, -1)              # (L, d)
        pairs = t.unflatten(-1, (-1, 2))
        rot = torch.stack((-pairs[..., 1], pairs[..., 0]), -1).flatten(-2)           # rotate_half, interleaved
        # contiguous like theirs (a concatenation): the attention matmuls' rounding follows the layout
        return (t * ang.cos() + rot * ang.sin()).contiguous()


class Attention(nn.Module):
    """Multi-head attention with a fused qkv projection and optional q/k RMS-norm and RoPE.
    Self-attention when `ctx` is None (their Attention / MultiHeadAttention); with `ctx` the
    queries come from x and keys/values from ctx through the same fused weight (their
    MultiHeadAttention(is_cross_attention=True): the cross-view attention)."""

    sequence_parallel = None  # model/parallel.py sets it on spatial and cross-view attention

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, qk_norm: bool = False,
                 rope: RotaryEmbedding | None = None, causal: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by {heads} heads")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        # a bound method, not a submodule: the rotary table lives once on the model (their `rope.freqs`)
        self._rope = [rope] if rope is not None else []
        self.causal = causal

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, L, D), ctx (N, Lk, D) or None -> (N, L, D)."""
        n, lq, _ = x.shape
        h, d = self.heads, self.head_dim
        if ctx is None:
            q, k, v = self.qkv(x).view(n, lq, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)   # (N, h, L, d)
        else:
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(x, w[: self.dim], None if b is None else b[: self.dim])
            kv = F.linear(ctx, w[self.dim:], None if b is None else b[self.dim:])
            q = q.view(n, lq, h, d).transpose(1, 2)
            k, v = kv.view(n, ctx.shape[1], 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self._rope:
            q, k = self._rope[0](q), self._rope[0](k)
            v = v.to(q.dtype)
        if self.sequence_parallel is not None:   # tokens split over ranks: all-to-all over heads
            out = self.sequence_parallel.attention(q, k, v)
        else:
            out = attention(q, k, v, self.causal)                                        # (N, h, L, d)
        return self.proj(out.transpose(1, 2).reshape(n, lq, self.dim).to(x.dtype))


class CrossAttention(nn.Module):
    """Queries from the latent tokens, keys/values from the condition tokens; no norm, no mask
    (their MultiHeadCrossAttention)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (N, L, D), cond (N, Lc, D) -> (N, L, D)."""
        n, lq, dim = x.shape
        q = self.q_linear(x).view(n, lq, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_linear(cond).view(n, cond.shape[1], 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, lq, dim))


class PatchEmbed3D(nn.Module):
    """(N, C, T, H, W) -> (N, T * h * w, D) by a (1, p, p) Conv3d; H and W are zero-padded at the
    end to multiples of p first."""

    def __init__(self, patch: int, in_channels: int, dim: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=(1, patch, patch), stride=(1, patch, patch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch
        x = F.pad(x, (0, (-x.shape[-1]) % p, 0, (-x.shape[-2]) % p))
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Scalar -> (N, D): [cos, sin] of 256 log-spaced frequencies -> MLP. Also the fps embedder
    (their SizeEmbedder is the same computation for one scalar per sample)."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
        ang = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([ang.cos(), ang.sin()], -1).to(self.mlp[0].weight.dtype))


class CaptionEmbedder(nn.Module):
    """T5 states -> tokens (y_proj MLP); `y_embedding` (text_len, text_dim) is the null caption."""

    def __init__(self, text_dim: int, dim: int, text_len: int):
        super().__init__()
        self.y_proj = Mlp(text_dim, dim, dim)
        self.register_buffer("y_embedding", torch.randn(text_len, text_dim) / text_dim ** 0.5)

    def forward(self, text: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """text (B, L, text_dim); keep (B,) bool (False: the null caption's first L tokens)."""
        if keep is not None:
            L = text.shape[1]
            if L > self.y_embedding.shape[0]:
                raise ValueError(f"text of {L} tokens is longer than the null caption "
                                 f"({self.y_embedding.shape[0]} = text_len)")
            text = torch.where(keep[:, None, None], text, self.y_embedding[:L].to(text.dtype))
        return self.y_proj(text)


class PositionEmbedding2D(nn.Module):
    """2-D sincos positions: for each token [sin, cos](w / s) then [sin, cos](h / s) on dim/4
    frequencies each, the grid rescaled to base_size / h (rows) and base_size / w (columns) and
    divided by scale = sqrt(H x W pixels) / input_sq_size (their PositionEmbedding2D)."""

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, half, 2).float() / half)),
                             persistent=False)

    def _sincos(self, t: torch.Tensor) -> torch.Tensor:
        out = t[:, None] * self.inv_freq[None]
        return torch.cat([out.sin(), out.cos()], -1)

    def forward(self, h: int, w: int, scale: float, base_size: int, device=None) -> torch.Tensor:
        """-> (h * w, dim) float32, token order row-major (h, w)."""
        gh = torch.arange(h, device=device) / scale * (base_size / h)
        gw = torch.arange(w, device=device) / scale * (base_size / w)
        cw = gw[None, :].expand(h, w).reshape(-1)
        ch = gh[:, None].expand(h, w).reshape(-1)
        return torch.cat([self._sincos(cw), self._sincos(ch)], -1)


class FinalLayer(nn.Module):
    """adaLN-single output head (their T2IFinalLayer): tokens -> p*p*C patch values, channel fastest."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm_final = layer_norm(dim)
        self.linear = nn.Linear(dim, out_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim ** 0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor, t0: torch.Tensor | None = None,
                x_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, T, S, D); t, t0 (N, D); x_mask (N, T) bool: True = noisy frame (t), False = clean (t0)."""
        shift, scale = (self.scale_shift_table[None] + t[:, None])[:, :, None, None].unbind(1)
        h = modulate(self.norm_final(x), shift, scale)
        if x_mask is not None:
            # theirs normalises the already modulated tokens again for the clean frames: kept as is
            s0, c0 = (self.scale_shift_table[None] + t0[:, None])[:, :, None, None].unbind(1)
            h = torch.where(x_mask[:, :, None, None], h, modulate(self.norm_final(h), s0, c0))
        return self.linear(h)
