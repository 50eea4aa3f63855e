"""The trainer with sequence parallelism (--sp, train/distributed.py): torchrun on CPU (gloo)
moves the weights as the single-process reference does."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_train_loop import REPO, _free_port, config, data  # noqa: F401  (data: module fixture)
from train import checkpoint as ckpt
from train.data import BatchStream, find_shards
from train.train import (TextSource, build_model, compute_loss, ema_update, lr_at, main, make_optimizer, seed_step,
                         step_generator)


def _torchrun(cfg, nproc: int, sp: int, *extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), "-m", "train.train", "--no-progress", "--out", cfg.out,
           "--steps", str(cfg.steps), "--sp", str(sp), "--data-root", cfg.data.root, "--stage", cfg.data.stage,
           "--text-cache", cfg.data.text_cache, "--set", "lr=2e-3", "--set", "warmup=3",
           "--set", "ema_decay=0.9", "--set", "val_every=0", "--set", "data.samples_per_chunk=6",
           "--set", "data.shuffle_buffer=3", "--set", "data.text_max_length=16", *extra]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ckpt.load_state(cfg.out)["data"]["world"] == nproc // sp        # data-parallel streams
    return load_file(str(ckpt.resolve(cfg.out) / "model.safetensors"))


def _reference(cfg, dp: int) -> tuple[dict, dict]:
    """One process: each step averages the gradients of the dp data-parallel ranks' batches."""
    torch.set_num_threads(1)
    model, ema = build_model(cfg)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = make_optimizer(cfg, model)
    shards = find_shards(cfg.data, "train", [])
    streams = [iter(BatchStream(shards, cfg.data, cfg.seed, rank=r, world=dp, stop_step=cfg.steps)) for r in range(dp)]
    text = TextSource(cfg.data.text_cache, None, cfg.data.text_max_length)
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        opt.zero_grad()
        for rank in range(dp):
            seed_step(cfg.seed, step, rank)
            loss = compute_loss(model, next(streams[rank]), text, cfg, step_generator(cfg.seed, step, rank),
                                torch.device("cpu"), False)
            (loss / dp).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema_update(ema, model, cfg.ema_decay)
    return model.state_dict(), init


def _check(got: dict, ref: dict, init: dict) -> None:
    change = max(float((ref[k] - init[k]).abs().max()) for k in got)
    moved = max(float((ref[k] - got[k]).abs().max()) for k in got)
    assert change > 1e-3            # training moved the weights...
    assert moved < 1e-5, moved      # ...and the SP run moved them the same way (float reduction order aside)


@pytest.mark.slow
def test_sp2_trainer_equals_one_process(data):
    """dp=1 x sp=2: two ranks train one batch stream, split over tokens."""
    cfg = config(data, "sp2", 2)
    # validation on the last step: the whole SP group of rank 0 runs the split model
    got = _torchrun(cfg, 2, 2, "--set", "val_every=2", "--set", "val_batches=1")
    _check(got, *_reference(cfg, dp=1))
    log = [json.loads(line) for line in (Path(cfg.out) / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and "val_loss" in log[-1] and "val_loss" not in log[0]
    assert math.isfinite(log[-1]["val_loss"])


@pytest.mark.slow
def test_dp2_sp2_trainer_equals_gradient_averaging(data):
    """dp=2 x sp=2 (4 processes): sum over each SP group, mean over the two data-parallel batches."""
    cfg = config(data, "dp2sp2", 2)
    got = _torchrun(cfg, nproc=4, sp=2)
    _check(got, *_reference(cfg, dp=2))


def test_sp_must_divide_the_world(capsys):
    assert main(["--sp", "3", "--out", "unused"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "sequence parallel size 3" in err[0]
