"""Sequence parallelism for MVDiT, Ulysses style (paper Appendix A; DeepSpeed-Ulysses).

The N ranks of one SP group hold the same sample. The token grid (B, V, T', S, D) is split
along the spatial axis S, so rank r owns tokens [r * S_l, (r + 1) * S_l) of every view and
latent frame (S padded at the end to N * S_l). Per token operations (MLPs, adaLN, the
cross-attention to condition tokens, the ControlNet's BEV attention) and the temporal
attention (over T' at one spatial position: local to the split) need no communication.
Spatial and cross-view attention need the whole S: before the attention kernel an
all-to-all turns (all heads, S_l local tokens) into (heads / N, all S tokens), after it the
inverse all-to-all brings the outputs back. Padded positions are dropped before the kernel,
so attention sees exactly the unsplit key set, in the unsplit order.

Gradients: the output is all-gathered and the loss is the same on every rank of the group,
so the gather's backward keeps this rank's slice, and every parameter's gradient on a rank
is the part that flows through its own tokens. The sum over the SP group is the full
gradient (train/distributed.py reduces it: sum over SP, mean over data parallel).

Hooks (the only edits to the model): `Attention.sequence_parallel` (spatial and cross-view
attention of every spatial block, base and ControlNet) and `MVDiT.sequence_parallel` (the
latent and ControlNet streams split after the patch embeddings, gathered before the final layer).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.layers import attention


class _Exchange(torch.autograd.Function):
    """all_to_all along dim 0 (P chunks): chunk j goes to rank j, chunk j of the result came
    from rank j. The exchange is its own transpose, so the backward is the same exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)   # like a contiguous tensor: the collective writes a flat buffer
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        g = g.contiguous()
        out = torch.empty_like(g)
        dist.all_to_all_single(out, g, group=ctx.group)
        return out, None


class _Gather(torch.autograd.Function):
    """all_gather along `dim`; the loss downstream is replicated on every rank of the group,
    so the backward keeps this rank's slice (no communication, no double counting)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group) -> torch.Tensor:
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        ctx.dim, ctx.rank, ctx.n = dim, rank, x.shape[dim]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g.narrow(ctx.dim, ctx.rank * ctx.n, ctx.n), None, None


class SequenceParallel:
    """One SP group's view of the current sequence: full length S and local length S_l."""

    def __init__(self, group=None):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        # S of the current forward, set by split and kept: checkpointed blocks recompute in backward
        self.seq_len: int | None = None
        self.local_len: int | None = None   # S_l = ceil(S / size)

    # ---- sequence split / gather (token axis) -------------------------------------------
    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's slice of `dim` (padded at the end to a multiple of the group size). The
        backward of narrow is zero outside the slice: the replicated computation upstream
        gets this rank's share of the gradient only."""
        dim = dim % x.dim()
        S = x.shape[dim]
        Sl = -(-S // self.size)
        self.seq_len, self.local_len = S, Sl
        if Sl * self.size != S:
            pad = [0, 0] * (x.dim() - 1 - dim) + [0, Sl * self.size - S]
            x = F.pad(x, pad)
        return x.narrow(dim, self.rank * Sl, Sl)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """All ranks' slices concatenated along `dim`, padding cropped: the unsplit tensor."""
        dim = dim % x.dim()
        full = _Gather.apply(x, dim, self.group)
        return full.narrow(dim, 0, self.seq_len)

    # ---- attention over the full sequence, heads split --------------------------------
    def _to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(N, h, m*S_l, d) local tokens, all heads -> (N, h/P, m*S, d) all tokens, this rank's
        heads. m > 1 when the keys are m local sequences side by side (cross-view context)."""
        P, S, Sl = self.size, self.seq_len, self.local_len
        N, h, L, d = x.shape
        m = L // Sl
        x = x.reshape(N, P, h // P, L, d).transpose(0, 1)                   # (P, N, h/P, m*S_l, d)
        x = _Exchange.apply(x, self.group)                                  # chunk j: rank j's tokens
        x = x.reshape(P, N, h // P, m, Sl, d).permute(1, 2, 3, 0, 4, 5)    # (N, h/P, m, P, S_l, d)
        return x.reshape(N, h // P, m, P * Sl, d)[:, :, :, :S].reshape(N, h // P, m * S, d)

    def _from_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(N, h/P, S, d) -> (N, h, S_l, d): the inverse of _to_heads for the queries' layout."""
        P, S, Sl = self.size, self.seq_len, self.local_len
        N, hp, _, d = x.shape
        x = F.pad(x, (0, 0, 0, P * Sl - S)).reshape(N, hp, P, Sl, d).permute(2, 0, 1, 3, 4)  # (P, N, h/P, S_l, d)
        x = _Exchange.apply(x, self.group)                                  # chunk j: heads of rank j
        return x.transpose(0, 1).reshape(N, P * hp, Sl, d)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (N, h, S_l, d), k/v (N, h, m*S_l, d) local -> (N, h, S_l, d): SDPA over all S tokens."""
        if self.seq_len is None:
            raise RuntimeError("SequenceParallel.attention called outside a split forward")
        if q.shape[1] % self.size:
            raise ValueError(f"sequence parallel: {q.shape[1]} heads do not split over {self.size} ranks; "
                             "choose an SP size that divides the head count")
        if q.shape[2] != self.local_len or k.shape[2] % self.local_len:
            raise RuntimeError(f"sequence parallel: query/key lengths {q.shape[2]}/{k.shape[2]} are not the "
                               f"local token count {self.local_len} (or a multiple of it for keys)")
        out = attention(self._to_heads(q), self._to_heads(k), self._to_heads(v))
        return self._from_heads(out)


def split(sp: SequenceParallel | None, x: torch.Tensor, dim: int) -> torch.Tensor:
    return x if sp is None else sp.split(x, dim)


def gather(sp: SequenceParallel | None, x: torch.Tensor, dim: int) -> torch.Tensor:
    return x if sp is None else sp.gather(x, dim)


def enable_sequence_parallel(model: nn.Module, group=None) -> SequenceParallel:
    """Hook MVDiT `model` (base blocks and ControlNet copies) into the SP group. Temporal
    attention is left alone: tokens are split along space, so it is local to each rank."""
    from model.blocks import MultiViewBlock
    sp = SequenceParallel(group)
    heads = model.config.heads
    if heads % sp.size:
        raise ValueError(f"sequence parallel size {sp.size} does not divide the model's {heads} heads")
    model.sequence_parallel = sp
    for m in model.modules():
        if isinstance(m, MultiViewBlock) and not m.temporal:
            m.attn.sequence_parallel = sp
            if m.cross_view:
                m.cross_view_attn.sequence_parallel = sp
    return sp


def disable_sequence_parallel(model: nn.Module) -> None:
    """Remove every hook set by enable_sequence_parallel (e.g. before deepcopy)."""
    for m in model.modules():
        if "sequence_parallel" in vars(m):
            del m.sequence_parallel


def block_units(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks, children before parents: `model.fsdp_units()` when the model
    defines it, else every element of each nn.ModuleList of "blocks" (elements of one class that
    each contain a module with modules of its own: a block holds attention layers that hold
    linears; a list of linears, norms or one-level wrappers is no list of blocks). The FSDP2
    units (train/sharding.py) and the memory plan's block kinds (model/memory.py) both use it."""
    if callable(getattr(model, "fsdp_units", None)):
        units = list(model.fsdp_units())
    else:
        units = []
        for m in model.modules():
            if isinstance(m, nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1 and all(
                    any(next(c.children(), None) is not None for c in b.children()) for b in m):
                units.extend(m)
    order = {id(m): i for i, m in enumerate(model.modules())}
    return sorted(units, key=lambda m: -order[id(m)])   # reverse pre-order: nested units first

