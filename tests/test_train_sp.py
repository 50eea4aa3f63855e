"""The trainer with sequence parallelism (--sp, train/distributed.py): torchrun on CPU (gloo)
moves the weights as the single-process reference does, with the state sharded (FSDP2, over
dp x sp) or replicated (DDP)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.test_train_loop import config, data  # noqa: F401  (data: module fixture)
from tests.train_runs import assert_trains_as, cli_args, reference, torchrun, weights
from train import checkpoint as ckpt
from train.train import main


@pytest.mark.slow
def test_sp2_trainer_equals_one_process(data):
    """dp=1 x sp=2 (FSDP2, the default): two ranks train one batch stream, split over tokens."""
    cfg = config(data, "sp2", 2)
    # validation on the last step: the whole SP group of rank 0 runs the split model
    summary = torchrun(2, [*cli_args(cfg), "--sp", "2", "--set", "val_every=2", "--set", "val_batches=1"])
    assert summary["sharding"] == "fsdp" and ckpt.load_state(cfg.out)["data"]["world"] == 1   # one data stream
    ref, ref_ema, init = reference(cfg, dp=1)
    assert_trains_as(weights(cfg.out), ref, init)
    assert_trains_as(weights(cfg.out, "ema"), ref_ema, init, tol=1e-6, moved=1e-4)
    log = [json.loads(line) for line in (Path(cfg.out) / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and "val_loss" in log[-1] and "val_loss" not in log[0]
    assert math.isfinite(log[-1]["val_loss"])


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["fsdp", "ddp"])
def test_dp2_sp2_trainer_equals_gradient_averaging(data, sharding):
    """dp=2 x sp=2 (4 processes): sum over each SP group, mean over the two data-parallel batches;
    FSDP2 shards over all 4 ranks (dp x sp flattened) with gradient checkpointing on."""
    cfg = config(data, f"dp2sp2_{sharding}", 2)
    summary = torchrun(4, [*cli_args(cfg), "--sp", "2", "--set", f"sharding={sharding}",
                           "--set", "grad_checkpointing=true"])
    assert summary["sharding"] == sharding and ckpt.load_state(cfg.out)["data"]["world"] == 2
    ref, _, init = reference(cfg, dp=2)
    assert_trains_as(weights(cfg.out), ref, init)


def test_sp_must_divide_the_world(capsys):
    assert main(["--sp", "3", "--out", "unused"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "sequence parallel size 3" in err[0]
