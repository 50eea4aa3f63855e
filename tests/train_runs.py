"""Helpers of the multi-process trainer tests: a torchrun of the real trainer CLI on CPU (gloo)
and the single-process reference it must equal (the gradient averaged over the data-parallel
ranks' batches, as DDP, FSDP and SP all claim to compute)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from train import checkpoint as ckpt
from train.data import BatchStream, find_shards
from train.sharding import EMA
from train.train import TextSource, build_model, compute_loss, lr_at, make_optimizer, seed_step, step_rng

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_args(cfg) -> list[str]:
    """The trainer CLI arguments of a tests.factories_train config."""
    return ["--no-progress", "--out", cfg.out, "--steps", str(cfg.steps), "--data-root", cfg.data.root,
            "--stage", cfg.data.stage, "--text-cache", cfg.data.text_cache, "--set", f"lr={cfg.lr}",
            "--set", f"eps={cfg.eps}", "--set", f"warmup={cfg.warmup}", "--set", f"ema_decay={cfg.ema_decay}",
            "--set", "val_every=0", "--set", f"data.samples_per_chunk={cfg.data.samples_per_chunk}",
            "--set", f"data.shuffle_buffer={cfg.data.shuffle_buffer}",
            "--set", f"data.text_max_length={cfg.data.text_max_length}"]


def torchrun(nproc: int, args: list[str], timeout: int = 600) -> dict:
    """`torchrun -m train.train ARGS` on `nproc` CPU processes -> rank 0's summary (its last stdout line)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "train.train", *args]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def weights(run: str | Path, which: str = "model") -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.resolve(run) / f"{which}.safetensors"))


def reference(cfg, dp: int) -> tuple[dict, dict, dict]:
    """One process: each step averages the gradients of the dp data-parallel ranks' batches.
    -> (model state, EMA state, initial state)."""
    torch.set_num_threads(1)
    from model.text import prepare_text_embeddings
    model = build_model(cfg)
    text = TextSource(cfg.data.text_cache, None, cfg.data.text_max_length)
    prepare_text_embeddings(model, text.embed)   # as the trainer does from scratch, before the EMA copies them
    init = {k: v.clone() for k, v in model.state_dict().items()}
    ema = EMA(model)
    opt = make_optimizer(cfg, model)
    shards = find_shards(cfg.data, "train", [])
    streams = [iter(BatchStream(shards, cfg.data, cfg.seed, rank=r, world=dp, stop_step=cfg.steps)) for r in range(dp)]
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        opt.zero_grad()
        for rank in range(dp):
            seed_step(cfg.seed, step, rank)
            loss = compute_loss(model, next(streams[rank]), text, cfg, step_rng(cfg.seed, step, rank),
                                torch.device("cpu"), False)
            (loss / dp).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(model, cfg.ema_decay)
    return model.state_dict(), ema.state_dict(), init


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def assert_trains_as(got: dict, ref: dict, init: dict, tol: float = 3e-5, moved: float = 1e-3) -> None:
    # tol: AdamW divides by sqrt(v), so a weight whose gradient is of rounding size takes a step that the
    # order of a sum (2 ranks vs 1 process) changes by ~1e-5 of a 1e-3 learning rate; a wrong gradient is
    # off by the learning rate itself (1e-3), 30x above
    assert max_diff(ref, init) > moved           # training moved the weights...
    assert max_diff(got, ref) < tol, max_diff(got, ref)   # ...and the run moved them the same way (rounding aside)
