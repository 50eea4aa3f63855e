"""Sharded training state (FSDP2, train/sharding.py) and sharded checkpoints (train/checkpoint.py)
with the real trainer under torchrun on CPU (gloo): FSDP2 trains as DDP does, holds 1/dp of
the optimizer state per rank, resumes exactly at the same world size, at world 1, and back at
world 2; its export samples."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from tests.test_train_loop import VIEWS, config, data  # noqa: F401  (data: module fixture)
from tests.train_runs import assert_trains_as, cli_args, max_diff, reference, torchrun, weights
from train import checkpoint as ckpt
from train.sharding import EMA
from train.train import build_model, make_optimizer, train

pytestmark = pytest.mark.slow
STEPS = 4


@pytest.fixture(scope="module")
def runs(data):
    """World 2, 4 steps, a checkpoint every 2: FSDP2 (the default) and DDP."""
    out = {}
    for sharding in ("fsdp", "ddp"):
        cfg = config(data, f"w2_{sharding}", STEPS)
        out[sharding] = (cfg, torchrun(2, [*cli_args(cfg), "--set", "ckpt_every=2", "--set", f"sharding={sharding}"]))
    return out


def test_fsdp_trains_as_ddp_and_as_gradient_averaging(runs):
    (cfg, fs), (dcfg, ds) = runs["fsdp"], runs["ddp"]
    assert fs["sharding"] == "fsdp" and ds["sharding"] == "ddp"
    ref, ref_ema, init = reference(cfg, dp=2)
    for run in (cfg.out, dcfg.out):
        assert_trains_as(weights(run), ref, init)
        assert_trains_as(weights(run, "ema"), ref_ema, init, tol=3e-6, moved=1e-4)
    # the gradient-norm clip sums squares per shard then across ranks (DDP: over the whole), and AdamW turns
    # that rounding into ~1e-5 of a 1e-3 step on weights whose gradient is of rounding size (see assert_trains_as)
    assert max_diff(weights(cfg.out), weights(dcfg.out)) < 3e-5
    assert max_diff(weights(cfg.out, "ema"), weights(dcfg.out, "ema")) < 3e-6


def test_each_rank_holds_half_of_the_optimizer_state(runs):
    """Measured by the trainer on each rank: the local bytes of the AdamW moments (and of the
    weights and the EMA). DDP holds the whole on both ranks; FSDP2 half (+ dim-0 padding)."""
    fs, ds = runs["fsdp"][1]["state_bytes_per_rank"], runs["ddp"][1]["state_bytes_per_rank"]
    for kind in ("optimizer", "params", "ema"):
        whole = ds[kind][0]
        assert ds[kind] == [whole, whole]
        for held in fs[kind]:
            assert whole / 2 * 0.999 <= held <= whole / 2 * 1.01, (kind, held, whole)  # 0.999: step counters
    n = sum(p.numel() for p in build_model(runs["ddp"][0]).parameters())
    assert ds["optimizer"][0] >= 2 * 4 * n   # two fp32 moments a parameter (+ the step counters)


def test_sharded_checkpoint_resumed_at_the_same_world_continues_exactly(runs, data):
    cfg = runs["fsdp"][0]
    half = config(data, "w2_half", 2)
    torchrun(2, cli_args(half))
    torchrun(2, ["--no-progress", "--out", half.out, "--resume", "--steps", str(STEPS)])
    for which in ("model", "ema"):
        a, b = weights(cfg.out, which), weights(half.out, which)
        assert all(torch.equal(a[k], b[k]) for k in a), which
    log = [json.loads(line) for line in (Path(half.out) / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]


def test_sharded_checkpoint_loads_at_world_1_and_trains_on_then_back_at_world_2(runs, data, caplog):
    (cfg, _), (dcfg, _) = runs["fsdp"], runs["ddp"]
    step2 = Path(cfg.out) / "checkpoints" / "step-0000002"
    # loading the world-2 shards into one process gives whole tensors equal to the export...
    torch.set_num_threads(1)
    model = build_model(cfg)
    ema, opt = EMA(model), make_optimizer(cfg, model)
    state = ckpt.load_training_state(step2, model, opt, ema)
    assert state["step"] == 2 and state["world"] == 2 and state["sharding"] == "fsdp"
    export = ckpt.load_weights(step2, "model")
    assert all(torch.equal(v, export[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, ckpt.load_weights(step2, "ema")[k]) for k, v in ema.state_dict().items())
    # ...and AdamW moments equal to DDP's at that step (DDP keeps them whole)
    model_d = build_model(cfg)
    ema_d, opt_d = EMA(model_d), make_optimizer(cfg, model_d)
    ckpt.load_training_state(Path(dcfg.out) / "checkpoints" / "step-0000002", model_d, opt_d, ema_d)
    for p, q in zip(model.parameters(), model_d.parameters()):
        for slot in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(opt.state[p][slot], opt_d.state[q][slot], rtol=1e-5, atol=1e-9), slot
        assert float(opt.state[p]["step"]) == 2.0
    # the trainer resumes it at world 1 (another data order: it says so) and trains on
    one = Path(data) / "w1_from_w2"
    shutil.copytree(cfg.out, one)
    with caplog.at_level(logging.WARNING, logger="train"):
        summary = train(config(data, "w1_from_w2", 3), resume=str(step2), progress=False)
    assert summary["step"] == 3 and summary["sharding"] == "none"
    assert any("data order differs" in r.message for r in caplog.records)
    log = [json.loads(line) for line in (one / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]                       # steps 3-4 of the world-2 run dropped
    assert ckpt.load_state(one)["world"] == 1 and torch.isfinite(torch.tensor(log[-1]["loss"]))
    # and the world-1 checkpoint resumes at world 2 again (whole tensors -> shards)
    torchrun(2, ["--no-progress", "--out", str(one), "--resume", "--steps", "5"])
    assert ckpt.load_state(one)["world"] == 2 and ckpt.load_state(one)["step"] == 5


def test_the_export_of_a_sharded_run_samples(runs, data):
    import av
    from pipeline.shards.vae import write_tiny_vae
    from train.sample import main as sample_main
    cfg = runs["fsdp"][0]
    write_tiny_vae(data / "vae_fsdp")
    out = data / "samples_fsdp"
    assert sample_main(["--ckpt", cfg.out, "--vae", str(data / "vae_fsdp"), "--out", str(out),
                        "--bucket", "32x64_t9", "--steps", "2"]) == 0
    with av.open(str(out / f"{VIEWS[0]}.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 9
