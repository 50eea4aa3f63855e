"""Where the training state lives on a multi-GPU run: FSDP2 (default) or DDP, the EMA, clipping.

`sharding: fsdp` (train/config.py; the default, used when the world is larger than 1): every
parameter, its gradient, its AdamW moments and its EMA are sharded along dim 0 over all ranks
(the flattened dp x sp mesh of train/distributed.py), `torch.distributed.fsdp.fully_shard`
(FSDP2). One FSDP unit per transformer block of the model (base and ControlNet blocks; see
`fsdp_units`) and the root for everything else: a unit's full weights exist only while it
runs (all-gathered before its forward and again before its backward, then freed), unless
`reshard_after_forward: false` keeps them from the forward to the backward (ZeRO-2: one
all-gather a step instead of two, for the memory of the unsharded weights). Mixed precision:
bf16 compute weights gathered from fp32 masters, gradients reduce-scattered in fp32
(`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`); the optimizer and the EMA
only ever touch the fp32 shards. The gradient reduction divides by dp, not by the world:
the SP group's gradient is the sum over its ranks (train/distributed.py).

`sharding: ddp`: every rank holds everything; DDP with `gradient_as_bucket_view=True` (the
gradients are views into the reduction buckets: no second gradient copy).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from train.config import SHARDINGS
from train.distributed import Topology, sp_grad_hook


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """One FSDP unit per transformer block (base and ControlNet), discovered from the model
    (model.parallel.block_units: its `fsdp_units()` or its ModuleLists of blocks)."""
    from model.parallel import block_units
    return block_units(model)


def shard_fsdp(model: nn.Module, topo: Topology, bf16: bool, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 in place on `model` (its class becomes FSDP<cls>; state_dict keys are unchanged)."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    # inputs are not cast: the model casts to its weights' dtype where it needs to, and the
    # float32 inputs it keeps on purpose (RoPE tables, timesteps) stay float32
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32,
                              cast_forward_inputs=False)
    for unit in fsdp_units(model):
        fully_shard(unit, mesh=topo.shard_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # the root keeps its weights from forward to backward (FSDP's default for the root)
    fully_shard(model, mesh=topo.shard_mesh, mp_policy=mp, reshard_after_forward=None if reshard_after_forward else False)
    if hasattr(model, "guided_velocity"):   # the samples during training call it, not forward: gather the root too
        from torch.distributed.fsdp import register_fsdp_forward_method
        register_fsdp_forward_method(model, "guided_velocity")
    gloo = dist.get_backend() == "gloo"
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(float(topo.dp))     # sum over SP, mean over DP
            if gloo:   # gloo has no PREMUL_SUM: reduce with SUM and scale separately
                m.set_force_sum_reduction_for_comms(True)
            # a step's bucket can leave a module without gradient on some ranks only (an image batch
            # never runs the BEV temporal merge): those reduce zeros, so every rank's collectives match
            m.set_reduce_scatter_unused_params(True, recurse=False)
    return model


def wrap_ddp(model: nn.Module, topo: Topology, device: torch.device) -> nn.Module:
    """DDP over the world, reducing as sp_grad_hook says when sp > 1."""
    # find_unused_parameters: a step's bucket/drops can leave a branch without gradient on one rank
    ddp = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True,
        gradient_as_bucket_view=True)
    if topo.sp > 1:
        ddp.register_comm_hook(None, sp_grad_hook(topo.dp))
    return ddp


def wrap(model: nn.Module, topo: Topology, device: torch.device, sharding: str, bf16: bool,
         reshard_after_forward: bool = True) -> nn.Module:
    """The module the loop calls: `model` itself (one process; FSDP2 works in place) or its DDP wrapper.
    `model` stays the handle for parameters, optimizer, EMA and checkpoints."""
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding {sharding!r}: use one of {SHARDINGS}")
    if topo.world == 1:
        return model
    if sharding == "fsdp":
        return shard_fsdp(model, topo, bf16, reshard_after_forward)
    return wrap_ddp(model, topo, device)


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def local_bytes(tensors) -> int:
    """Bytes this rank holds of `tensors` (a DTensor counts its local shard)."""
    n = 0
    for t in tensors:
        t = t.to_local() if is_sharded(t) else t
        n += t.numel() * t.element_size()
    return n


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a DTensor: every rank must call it)."""
    return t.full_tensor() if is_sharded(t) else t


class EMA:
    """fp32 exponential moving average of the weights, keyed like `model.state_dict()`, each
    entry laid out as the parameter it follows (a DTensor shard under FSDP): sharding the
    model shards the EMA. Buffers are copied, not averaged."""

    def __init__(self, model: nn.Module):
        with torch.no_grad():
            self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        params = dict(model.named_parameters())
        avg = [k for k in self.shadow if k in params]
        torch._foreach_lerp_([self.shadow[k] for k in avg], [params[k].detach().float() for k in avg], 1.0 - decay)
        for k, b in model.named_buffers():
            if k in self.shadow:
                self.shadow[k].copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over (possibly sharded) gradients: the norm of the whole
    gradient, all shards of every rank together (torchtitan's idiom); max_norm <= 0: no clipping."""
    params = [p for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
    if is_sharded(total):
        total = total.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer, ema) -> dict[str, int]:
    """Bytes of training state this rank holds (its shards under FSDP)."""
    return {"params": local_bytes(model.parameters()),
            "optimizer": local_bytes(v for s in opt.state.values() for v in s.values()
                                      if isinstance(v, torch.Tensor)),
            "ema": local_bytes(ema.state_dict().values())}


def gather_ints(values: list[int], world: int) -> list[list[int]]:
    """Every rank's `values` (a collective)."""
    t = torch.tensor(values, dtype=torch.int64)
    if world == 1:
        return [t.tolist()]
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t)
    return [p.tolist() for p in parts]
