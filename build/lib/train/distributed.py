"""Process layout of a run: world = dp x sp (data parallel x sequence parallel).

Ranks [g * sp, (g + 1) * sp) form SP group g (consecutive ranks: on one node, over NVLink
with torchrun's rank order) and share one batch: data stream, timesteps, noise and condition
drops all come from the data-parallel rank g. The layout is one 2-D device mesh ("dp", "sp"),
built once, here: its "sp" dimension gives the SP groups, and the training state is sharded
over both dimensions flattened ("dp_sp", as torchtitan shards over its `dp_shard_cp`), so a
GPU holds 1 / world of the weights, gradients, optimizer state and EMA whatever the SP size.

Gradients: inside an SP group each rank holds the part of every parameter's gradient that
flows through its own tokens (model/parallel.py), so the right reduction is the SUM over the
SP group and the MEAN over data parallel: one reduction over the world that divides by dp
(not by world). FSDP2 gets it as its gradient divide factor (train/sharding.py), DDP as the
comm hook `sp_grad_hook`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Topology:
    rank: int = 0
    world: int = 1
    sp: int = 1              # SP group size
    sp_group: object = None  # this rank's SP process group (None when sp == 1)
    mesh: object = None      # DeviceMesh ("dp", "sp") when world > 1
    shard_mesh: object = None  # the mesh flattened to one "dp_sp" dimension: what FSDP2 shards over

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


def setup_distributed(device_pref: str) -> tuple[int, int, torch.device]:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is one process."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device_pref == "auto":
        device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(device_pref)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return rank, world, device


def check_sp(sp: int, world: int) -> None:
    if sp < 1 or world % sp:
        raise ValueError(f"sequence parallel size {sp} must be >= 1 and divide the world size {world} "
                         "(world = data parallel x sequence parallel); e.g. torchrun --nproc_per_node 8 ... --sp 4")


def make_topology(rank: int, world: int, sp: int, device_type: str | None = None) -> Topology:
    """Build the mesh and the SP groups (every rank must call this, in the same order).
    `device_type` of the mesh: default from the process group's backend (nccl -> cuda)."""
    check_sp(sp, world)
    topo = Topology(rank, world, sp)
    if world == 1:
        return topo
    from torch.distributed.device_mesh import init_device_mesh
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    # row-major: mesh[g, j] = g * sp + j, so the "sp" rows are the consecutive-rank SP groups
    topo.mesh = init_device_mesh(device_type, (world // sp, sp), mesh_dim_names=("dp", "sp"))
    topo.shard_mesh = topo.mesh["dp", "sp"]._flatten("dp_sp")
    if sp > 1:
        topo.sp_group = topo.mesh.get_group("sp")
    return topo


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def sp_grad_hook(dp: int):
    """DDP comm hook over the whole world: sum over the SP group, mean over data parallel."""
    def hook(process_group, bucket):  # no annotations: DDP checks them, and they are strings here
        buf = bucket.buffer().div_(dp)
        fut = dist.all_reduce(buf, group=process_group, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])
    return hook
