"""Process layout of a run: world = dp x sp (data parallel x sequence parallel).

Ranks [g * sp, (g + 1) * sp) form SP group g (consecutive ranks: on one node, over NVLink
with torchrun's rank order) and share one batch: data stream, timesteps, noise and condition
drops all come from the data-parallel rank g. Every process group is built once, here.

Gradients: inside an SP group each rank holds the part of every parameter's gradient that
flows through its own tokens (model/parallel.py), so the right reduction is the SUM over the
SP group and the MEAN over data parallel. One all-reduce over the world does both when each
rank divides by dp (not by world, as DDP's default hook does): `sp_grad_hook`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Topology:
    rank: int = 0
    world: int = 1
    sp: int = 1            # SP group size
    sp_group: object = None  # this rank's SP process group (None when sp == 1)

    @property
    def dp(self) -> int:
        return self.world // self.sp

    @property
    def dp_rank(self) -> int:
        """The data-parallel rank: which batch this rank's SP group trains on."""
        return self.rank // self.sp

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp


def check_sp(sp: int, world: int) -> None:
    if sp < 1 or world % sp:
        raise ValueError(f"sequence parallel size {sp} must be >= 1 and divide the world size {world} "
                         "(world = data parallel x sequence parallel); e.g. torchrun --nproc_per_node 8 ... --sp 4")


def make_topology(rank: int, world: int, sp: int) -> Topology:
    """Build the SP groups (every rank must call this, in the same order)."""
    check_sp(sp, world)
    topo = Topology(rank, world, sp)
    if sp > 1:
        for g in range(world // sp):
            group = dist.new_group(list(range(g * sp, (g + 1) * sp)))
            if g == topo.dp_rank:
                topo.sp_group = group
    return topo


def sp_grad_hook(dp: int):
    """DDP comm hook over the whole world: sum over the SP group, mean over data parallel."""
    def hook(process_group, bucket):  # no annotations: DDP checks them, and they are strings here
        buf = bucket.buffer().div_(dp)
        fut = dist.all_reduce(buf, group=process_group, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])
    return hook


def wrap_ddp(model: torch.nn.Module, topo: Topology, device: torch.device) -> torch.nn.Module:
    """DDP over the world (when world > 1), reducing as sp_grad_hook says when sp > 1."""
    if topo.world == 1:
        return model
    # find_unused_parameters: a step's bucket/drops can leave a branch without gradient on one rank
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    if topo.sp > 1:
        ddp.register_comm_hook(None, sp_grad_hook(topo.dp))
    return ddp
