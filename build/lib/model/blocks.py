"""The MVDiT block: the authors' MultiViewSTDiT3Block.

    x -> self-attention (over S: spatial block; over T' with RoPE: temporal block), adaLN gated
      -> cross-attention to the per-(view, latent frame) condition tokens (no norm, ungated)
      -> cross-view attention (spatial base blocks only): norm3, modulated by the block's
         scale_shift_table_mva plus the first 3 scalars of the timestep projection; each view
         attends to each of its ring neighbours separately and the results are summed; gated,
         then the zero-initialised mva_proj
      -> MLP, adaLN gated
    ControlNet blocks also return after_proj(x) (zero-initialised), added to the base stream.

Tokens are (N, T' * S, D) with N = B * V (views folded into the batch, view fastest); the
timestep projection is per sample (B, 6 D) and repeated over the views. `x_mask` (N, T') selects,
per latent frame, the modulation of the timestep (True, a noisy frame) or of t = 0 (False, a
clean frame given as context): the authors' image/video conditioning masks.
"""
from __future__ import annotations

import torch
from torch import nn

from model.layers import Attention, CrossAttention, Mlp, RotaryEmbedding, layer_norm, modulate


def ring_order(views: int) -> list[tuple[int, int]]:
    """(target, neighbour) pairs of the camera ring: view v attends to v-1 and v+1 (for six
    nuScenes views the authors' mv_order_map {0: [5, 1], 1: [0, 2], ..., 5: [4, 0]})."""
    return [(v, n) for v in range(views) for n in ((v - 1) % views, (v + 1) % views)]


def order_pairs(order_map: dict) -> list[tuple[int, int]]:
    """The authors' mv_order_map {target: [neighbours]} -> (target, neighbour) pairs, in its order."""
    return [(int(k), int(n)) for k, ns in order_map.items() for n in ns]


class MultiViewBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool, temporal: bool = False,
                 rope: RotaryEmbedding | None = None, cross_view: bool = True, control: bool = False):
        super().__init__()
        self.temporal = temporal
        self.norm1 = layer_norm(dim)
        self.attn = Attention(dim, heads, qkv_bias=True, qk_norm=qk_norm, rope=rope if temporal else None)
        self.cross_attn = CrossAttention(dim, heads)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.cross_view = cross_view and not temporal
        if self.cross_view:
            self.norm3 = layer_norm(dim)
            self.cross_view_attn = Attention(dim, heads, qkv_bias=False, qk_norm=True)
            self.mva_proj = nn.Linear(dim, dim)
            self.scale_shift_table_mva = nn.Parameter(torch.randn(3, dim) / dim ** 0.5)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim ** 0.5)
        self.after_proj = nn.Linear(dim, dim) if control else None

    @staticmethod
    def _select(x_mask, a: torch.Tensor, b: torch.Tensor, T: int) -> torch.Tensor:
        """Per latent frame: a where x_mask (noisy frame), else b. (N, T*S, D) each."""
        if x_mask is None:
            return a
        n, L, d = a.shape
        return torch.where(x_mask[:, :, None, None], a.view(n, T, L // T, d), b.view(n, T, L // T, d)).view(n, L, d)

    def _mods(self, table: torch.Tensor, t: torch.Tensor, views: int) -> list[torch.Tensor]:
        """(6, D) table + (B, 6 D) projection -> 6 tensors (B*V, 1, D). The cross-view table (3, D) gets
        the first 3 SCALARS of the projection, one per chunk, broadcast over D (their t[:, :3])."""
        k, d = table.shape
        tt = t.reshape(t.shape[0], 6, d) if k == 6 else t[:, :k, None]
        m = (table[None] + tt).repeat_interleave(views, 0)
        return list(m.unsqueeze(2).unbind(1))

    def forward(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, t0: torch.Tensor | None,
                x_mask: torch.Tensor | None, T: int, S: int, views: int, pairs: list[tuple[int, int]]):
        """x (N, T*S, D); y (N, T, Lc, D) keys per latent frame (or (N, 1, Lc, D) for all);
        t, t0 (B, 6 D); x_mask (N, T) bool or None; pairs: (target, neighbour) views."""
        N, L, D = x.shape
        sh, sc, g, sh_m, sc_m, g_m = self._mods(self.scale_shift_table, t, views)
        z = self._mods(self.scale_shift_table, t0, views) if x_mask is not None else [None] * 6

        # ---- self-attention ----
        h = self._select(x_mask, modulate(self.norm1(x), sh, sc),
                         modulate(self.norm1(x), z[0], z[1]) if x_mask is not None else None, T)
        if self.temporal:
            h = h.view(N, T, S, D).transpose(1, 2).reshape(N * S, T, D)
            h = self.attn(h).view(N, S, T, D).transpose(1, 2).reshape(N, L, D)
        else:
            h = h.reshape(N * T, S, D)
            h = self.attn(h, h).view(N, L, D)   # q and kv projected apart, as their MultiHeadAttention
        x = x + self._select(x_mask, g * h, z[2] * h if x_mask is not None else None, T)

        # ---- cross-attention (keys of this view and latent frame) ----
        if y.shape[1] == 1:
            x = x + self.cross_attn(x, y[:, 0])
        else:
            x = x + self.cross_attn(x.reshape(N * T, S, D), y.flatten(0, 1)).view(N, L, D)

        # ---- cross-view attention ----
        if self.cross_view:
            sh_v, sc_v, g_v = self._mods(self.scale_shift_table_mva, t, views)
            h = modulate(self.norm3(x), sh_v, sc_v)
            z_v = self._mods(self.scale_shift_table_mva, t0, views) if x_mask is not None else [None] * 3
            if x_mask is not None:
                h = self._select(x_mask, h, modulate(self.norm3(x), z_v[0], z_v[1]), T)
            h = self._cross_view(h, T, S, views, pairs)
            x = x + self.mva_proj(self._select(x_mask, g_v * h, z_v[2] * h if x_mask is not None else None, T))

        # ---- MLP ----
        h = self._select(x_mask, modulate(self.norm2(x), sh_m, sc_m),
                         modulate(self.norm2(x), z[3], z[4]) if x_mask is not None else None, T)
        h = self.mlp(h)
        x = x + self._select(x_mask, g_m * h, z[5] * h if x_mask is not None else None, T)
        if self.after_proj is not None:
            return x, self.after_proj(x)
        return x

    def _cross_view(self, h: torch.Tensor, T: int, S: int, views: int, pairs: list[tuple[int, int]]) -> torch.Tensor:
        """h (B*V, T*S, D) -> sum over each view's neighbours of attention(view, neighbour), same shape."""
        N, L, D = h.shape
        B = N // views
        hv = h.view(B, views, T, S, D).transpose(1, 2).reshape(B * T, views, S, D)   # (B T') V S D
        tgt = torch.tensor([p[0] for p in pairs], device=h.device)
        nbr = torch.tensor([p[1] for p in pairs], device=h.device)
        P = len(pairs)
        q = hv[:, tgt].reshape(B * T * P, S, D)
        kv = hv[:, nbr].reshape(B * T * P, S, D)
        res = self.cross_view_attn(q, kv).view(B * T, P, S, D)
        out = torch.zeros_like(res[:, :1]).expand(-1, views, -1, -1).clone().index_add_(1, tgt, res)  # sum per target
        return out.view(B, T, views, S, D).transpose(1, 2).reshape(N, L, D)
