"""The trainer's habits: gradient accumulation, TensorBoard, clips sampled during training, train
configs by name. (The smoothed losses across --resume: tests/test_train_loop.py, on its runs.)"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.test_train_loop import config, data  # noqa: F401  (data: module fixture)
from tests.train_runs import max_diff, weights
from pipeline.scenes.buckets import STAGES_DIR, load_stage
from train import tblog
from train.config import CONFIGS_DIR, config_names, load_config
from train.train import main, train

REPO = Path(__file__).resolve().parents[1]


def _stage(root: Path, name: str, batch: int) -> str:
    path = root / f"{name}.yaml"
    path.write_text(f"name: {name}\nbuckets:\n  - {{height: 32, width: 64, num_frames: 9, batch_size: {batch}}}\n")
    return str(path)


def test_two_half_batches_accumulated_make_the_full_batch_step(data):
    """grad_accum 2 at batch 2 = batch 4, drops on: every draw is per sample (train/loss.py), and the
    one bucket's stream hands out samples in the same order whatever the batch size."""
    torch.set_num_threads(1)
    full = config(data, "acc_full", 1)
    full.data.stage = _stage(data, "b4", 4)
    half = config(data, "acc_half", 1, grad_accum=2)
    half.data.stage = _stage(data, "b2", 2)
    train(full, progress=False)
    train(half, progress=False)
    wf, wh = weights(data / "acc_full"), weights(data / "acc_half")
    init = config(data, "acc_init", 1)
    from train.train import build_model
    w0 = build_model(init).state_dict()
    assert max_diff(wf, {k: w0[k] for k in wf}) > 1e-3     # the step moved the weights
    # Adam's first step is ~ lr * g / |g| (6.7e-4 here): a wrong gradient moves a weight by ~1e-3. Rounding
    # (the two half-batch sums) shows only in the few weights whose gradient is ~eps: measured 53 of 760k
    # weights off by > 1e-6, at most 1.5e-5
    diff = torch.cat([(wf[k] - wh[k]).abs().flatten() for k in wf])
    assert float(diff.max()) < 1e-4 and int((diff > 1e-6).sum()) < 1e-3 * diff.numel(), (diff.max(), (diff > 1e-6).sum())
    lf, lh = (json.loads((data / r / "log.jsonl").read_text().splitlines()[0]) for r in ("acc_full", "acc_half"))
    assert lf["batch"] == lh["batch"] == 4 and lh["grad_accum"] == 2 and lh["buckets"] == ["32x64_t9"] * 2
    assert lh["loss"] == pytest.approx(lf["loss"], rel=1e-6)
    assert (lh["drop_all"], lh["drop_frames"]) == (lf["drop_all"], lf["drop_frames"])


def test_tensorboard_and_a_sample_clip_during_training(data, tmp_path):
    from pipeline.shards.vae import write_tiny_vae
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from train.sample import generate
    from train.textsource import TextSource
    from train.livesample import fixed_conditions
    torch.set_num_threads(1)
    write_tiny_vae(tmp_path / "vae")
    cfg = config(data, "live", 2, sample_every=2, sample_steps=2, sample_bucket="32x64_t9", vae=str(tmp_path / "vae"))
    train(cfg, progress=False)
    run = data / "live"
    folder = run / "samples" / "step-0000002"
    info = json.loads((folder / "sample.json").read_text())
    assert info["split"] == "val" and info["decoded"] and info["frames"][:2] == [3, 9]   # 3 views, 9 frames
    assert {"grid.mp4", "contact_sheet.png", "latents.safetensors", "CAM_FRONT.mp4"} <= {p.name for p in folder.iterdir()}
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert "sample" not in log[0] and log[1]["sample"] == str(folder)
    # the clip is the sampler's (train/sample.py generate) on the step's EMA weights, fixed conditions
    from model.registry import build_from_config
    from train import checkpoint as ckpt
    model = build_from_config(ckpt.load_config(run)["model"])
    model.load_state_dict(ckpt.load_weights(run, "ema"))
    s, _, _ = fixed_conditions(cfg)
    want = generate(model.eval(), TextSource(cfg.data.text_cache, None, 16), cfg, s, cfg.seed, 2, cfg.flow.cfg_scale,
                    torch.device("cpu"), False)
    assert torch.allclose(load_file(str(folder / "latents.safetensors"))["latents"], want, atol=1e-5)
    # TensorBoard: every step's scalars, as in log.jsonl, and the clip
    ea = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    tags = ea.Tags()
    assert {"loss", "lr", "grad_norm", "batch", "drop_all", "loss_by_bucket/32x64_t9"} <= set(tags["scalars"])
    assert [e.value for e in ea.Scalars("loss")] == pytest.approx([r["loss"] for r in log])
    assert {"samples/grid", "samples/contact_sheet"} <= set(tags["images"])
    gif = ea.Images("samples/grid")[0]
    assert gif.step == 2 and gif.encoded_image_string[:6] == b"GIF89a"


def test_without_a_vae_the_clip_is_a_latent_preview(data):
    torch.set_num_threads(1)
    cfg = config(data, "preview", 1, sample_every=1, sample_steps=1, tensorboard=False)
    train(cfg, progress=False)
    folder = data / "preview" / "samples" / "step-0000001"
    info = json.loads((folder / "sample.json").read_text())
    assert not info["decoded"] and info["frames"][-1] == 3
    assert not (data / "preview" / "tb").exists()   # tensorboard: false


def test_tensorboard_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)    # as if not installed: the import fails
    said: list[str] = []
    assert tblog.check("auto", said.append) is False and len(said) == 1 and "[tb]" in said[0]
    assert tblog.check(False) is False
    from pipeline.contract.cli import BadInput
    with pytest.raises(BadInput, match="tensorboard: true"):
        tblog.check(True)


def test_configs_by_name_and_an_unknown_name(capsys):
    assert {"demo", "stage1", "stage2", "stage3"} <= set(config_names())
    assert load_config("stage2").model == "paper" and load_config("demo").steps == 200
    assert main(["--config", "stagetwo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "demo, demo_stage1" in err[0]
    assert "stagetwo.yaml" not in err[0]     # never the path that just failed
    assert main(["--config", "/nowhere/x.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: train config file /nowhere/x.yaml not found") and "known names: demo" in err


@pytest.mark.slow
def test_an_installed_package_finds_its_train_and_stage_configs_from_another_folder(tmp_path):
    """A non-editable install (wheel) run from elsewhere: the yaml files ship as package data."""
    # built from a copy: setuptools writes build/ and *.egg-info beside the sources it builds
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "demo_out", "build", "dist", "tests",
                                                             "bench", "docs", "__pycache__", "*.egg-info"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"train/configs/{p.name}" for p in CONFIGS_DIR.glob("*.yaml")} <= set(names)
    assert {f"pipeline/configs/stages/{p.name}" for p in STAGES_DIR.glob("*.yaml")} <= set(names)
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    # a train config by name, and the stage (buckets) it names, by name too
    code = ("from train.config import load_config, CONFIGS_DIR; from train.buckets import stage_specs; "
            "from pipeline.scenes.buckets import STAGES_DIR; "
            "c = load_config('stage2'); print(c.steps, len(stage_specs(c.data.stage)), CONFIGS_DIR, STAGES_DIR)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site"),
                       "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    steps, buckets, where, stages_where = r.stdout.split()
    assert steps == "40000" and int(buckets) == len(load_stage("stage2").buckets) > 0
    assert Path(where).is_relative_to(tmp_path / "site") and Path(stages_where).is_relative_to(tmp_path / "site")


@pytest.mark.slow
def test_fsdp_ranks_sample_together(data):
    """torchrun, 2 ranks, FSDP2: every rank runs the sampler's forwards (guided_velocity registered as an
    FSDP forward method), rank 0 writes the clip: the sampler's latents on the checkpoint's EMA weights."""
    from model.registry import build_from_config
    from tests.train_runs import cli_args, torchrun
    from train import checkpoint as ckpt
    from train.livesample import fixed_conditions
    from train.sample import generate
    from train.textsource import TextSource
    cfg = config(data, "fsdp_live", 1, sample_every=1, sample_steps=2, sample_bucket="32x64_t9")
    torchrun(2, cli_args(cfg) + ["--set", "sample_every=1", "--set", "sample_steps=2", "--set",
                                 "sample_bucket=32x64_t9"])
    run = data / "fsdp_live"
    lat = load_file(str(run / "samples" / "step-0000001" / "latents.safetensors"))["latents"]
    model = build_from_config(ckpt.load_config(run)["model"])
    model.load_state_dict(ckpt.load_weights(run, "ema"))
    want = generate(model.eval(), TextSource(cfg.data.text_cache, None, 16), cfg, fixed_conditions(cfg)[0], cfg.seed,
                    2, cfg.flow.cfg_scale, torch.device("cpu"), False)
    assert torch.allclose(lat, want, atol=1e-4), float((lat - want).abs().max())
