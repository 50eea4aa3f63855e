"""Sequence parallelism (model/parallel.py): 2 gloo processes on CPU give the single-process
forward output and parameter gradients of the tiny MVDiT."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.conditions import random_conditions
from model.parallel import SequenceParallel, enable_sequence_parallel
from model.registry import build_model

VARIANTS = [  # (ModelConfig overrides, gradient checkpointing)
    ({"cross_view": "ring"}, True),
    ({"control_depth": 2, "control_cross_view": True}, False),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _model_and_inputs(overrides: dict):
    """Tiny MVDiT with every weight perturbed (at init the zero-init output layers would make
    most gradients zero), and a batch whose latent grid has an odd token count (S = 3 x 5 = 15),
    so the split pads; sample 1 drops every condition, sample 0 two frames' boxes and ego poses."""
    torch.manual_seed(0)
    model = build_model("tiny", **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    cond = random_conditions(2, 3, 9, boxes=3, text_len=6, text_dim=32, bev_size=40, generator=g)
    x = torch.randn(2, 3, 16, 3, 6, 10, generator=g)                     # (B, V, C, T', H', W')
    t = torch.rand(2, generator=g)
    drop_frames = torch.zeros(2, 9, dtype=torch.bool)
    drop_frames[0, [3, 5]] = True
    cond = model.draw_box_latent(cond, g)
    target = torch.randn(x.shape, generator=g)
    return model, (x, t, cond, torch.tensor([False, True]), drop_frames), target


def _loss_and_grads(model, inputs, target):
    model.zero_grad(set_to_none=True)
    out = model(*inputs)
    (out * target).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, world: int, port: int) -> None:
    _init(rank, world, port)
    try:
        for overrides, checkpointing in VARIANTS:
            model, inputs, target = _model_and_inputs(overrides)
            model.enable_gradient_checkpointing(checkpointing)
            ref_out, ref_grads = _loss_and_grads(model, inputs, target)
            unused = [n for n, g in ref_grads.items() if float(g.abs().max()) == 0.0]
            assert not unused, f"parameters without gradient in the reference: {unused}"
            assert len(ref_grads) == len(list(model.parameters()))

            enable_sequence_parallel(model)
            out, grads = _loss_and_grads(model, inputs, target)
            for g in grads.values():              # the trainer's reduction: sum over the SP group
                dist.all_reduce(g)
            err = float((out - ref_out).abs().max())
            assert err < 1e-5 * max(1.0, float(ref_out.abs().max())), (overrides, "output", err)
            assert set(grads) == set(ref_grads)
            for name, g in grads.items():
                ref = ref_grads[name]
                err = float((g - ref).abs().max())
                assert err <= 1e-5 + 1e-4 * float(ref.abs().max()), (overrides, name, err, float(ref.abs().max()))
            # each rank alone holds only part of the gradient (so the reduction is needed)
            assert float((model.x_embedder.proj.weight.grad - ref_grads["x_embedder.proj.weight"]).abs().max()) > 0
        with pytest.raises(ValueError, match="does not divide"):
            with torch.device("meta"):
                enable_sequence_parallel(build_model("tiny", heads=1))
    finally:
        dist.destroy_process_group()


def _split_gather_worker(rank: int, world: int, port: int) -> None:
    _init(rank, world, port)
    try:
        sp = SequenceParallel()
        x = torch.arange(2 * 7 * 3, dtype=torch.float32).view(2, 7, 3).requires_grad_()
        local = sp.split(x, dim=1)                                          # 7 tokens -> 4 + 3 (+1 pad)
        assert local.shape == (2, 4, 3) and sp.seq_len == 7 and sp.local_len == 4
        assert torch.equal(local[:, : 7 - 4 * rank], x.detach()[:, 4 * rank: 4 * rank + 4])
        full = sp.gather(local * (rank + 1), dim=1)
        assert full.shape == x.shape
        assert torch.equal(full[:, :4], x.detach()[:, :4]) and torch.equal(full[:, 4:], 2 * x.detach()[:, 4:])
        full.sum().backward()                     # the same loss on both ranks: each keeps its slice
        want = torch.zeros_like(x)
        want[:, 4 * rank: 4 * rank + 4] = rank + 1
        assert torch.equal(x.grad, want)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_split_then_gather_round_trip_and_gradient_slices():
    mp.spawn(_split_gather_worker, args=(2, _free_port()), nprocs=2)


@pytest.mark.slow
def test_sp2_forward_and_gradients_equal_single_process():
    mp.spawn(_worker, args=(2, _free_port()), nprocs=2)
