"""train/sample.py (mdv2-sample) and train/vaedecode.py: the one model call with its guidance, several
conditioning samples in one command, the tiled CogVAE decode, and --sp 2 under torchrun (slow).

The fixture `run` (shared with tests/test_generate.py) is a real tiny run: factory shards (3 views,
32x64, T = 9 and 1), a tiny T5 caption cache, one trainer step of the tiny MVDiT (a real run folder and
checkpoint), whose weights are then replaced by the model's initialisation with values where it has
zeros (tests/factories_train.perturb_zero_init: one step leaves the zero-initialised final layer and
gates near zero, so every velocity would be ~0 and every comparison trivial), and a tiny CogVAE."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.contract import schema
from tests.factories import write_shards
from tests.factories_train import perturb_zero_init, train_config
from train.video import read_pngs

REPO = Path(__file__).resolve().parents[1]
VIEWS = schema.VIEWS[:3]
STAGE = """name: t
buckets:
  - {height: 32, width: 64, num_frames: 1, batch_size: 2}
  - {height: 32, width: 64, num_frames: 9, batch_size: 2}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from model.registry import build_from_config
    from model.text import T5TextEncoder, TextEmbeddingCache, read_captions, write_tiny_t5
    from pipeline.shards.vae import write_tiny_vae
    from train import checkpoint as ckpt
    from train.train import train
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sample")
    write_shards(root / "shards", {(32, 64, 9): 2}, per_shard=2, views=VIEWS, num_boxes=3)
    write_shards(root / "shards", {(32, 64, 9): 3, (32, 64, 1): 2}, split="val", per_shard=2, views=VIEWS,
                 num_boxes=3, seed=99)
    (root / "stage.yaml").write_text(STAGE)
    write_tiny_t5(root / "t5")
    TextEmbeddingCache(root / "text_cache").build(read_captions(str(root / "shards")),
                                                  T5TextEncoder(root / "t5", max_length=16), progress=False)
    train(train_config(root, "run", 1), progress=False)
    folder = ckpt.resolve(root / "run")
    torch.manual_seed(0)
    model = build_from_config(ckpt.load_config(folder)["model"])    # zero-init tensors exactly zero again
    weights = ckpt.state_dict_fp32(perturb_zero_init(model, std=0.1))
    for name in ("ema.safetensors", "model.safetensors"):
        save_file(weights, str(folder / name))
    write_tiny_vae(root / "vae")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, module: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", module, *args]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def mp4_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def sample_args(run: Path, out: Path, *extra: str) -> list[str]:
    return ["--ckpt", str(run / "run"), "--vae", str(run / "vae"), "--out", str(out), "--data-root",
            str(run / "shards"), "--text-cache", str(run / "text_cache"), "--steps", "2", "--no-progress", *extra]


# ---- the model call ----------------------------------------------------------------------

def test_velocity_fn_is_classifier_free_guidance(run):
    """v = v_null + s (v_cond - v_null): s = 1 is the plain conditional forward, s = 0 the model's null branch."""
    from model.conditions import random_conditions
    from train.sample import load_model, velocity_fn
    model, _ = load_model(str(run / "run"))
    g = torch.Generator().manual_seed(0)
    cond = random_conditions(1, 3, 9, boxes=3, text_len=16, text_dim=model.config.text_dim, generator=g)
    cond = model.draw_box_latent(cond, g)
    x, t = torch.randn(1, 3, 16, 3, 4, 8, generator=g), torch.tensor([0.6])
    with torch.no_grad():
        v_cond = model(x, t, cond)
        plain = velocity_fn(model, cond, 1.0)(x, t)
        v_null = velocity_fn(model, cond, 0.0)(x, t)
        guided = velocity_fn(model, cond, 2.5)(x, t)
    torch.testing.assert_close(plain, v_cond, rtol=1e-5, atol=1e-6)
    assert float((v_cond - v_null).abs().max()) > 1e-2          # the conditions matter to this model
    torch.testing.assert_close(guided, v_null + 2.5 * (v_cond - v_null), rtol=1e-4, atol=1e-5)


# ---- several conditioning samples in one command --------------------------------------------

def test_limit_samples_each_clip_into_its_own_folder(run):
    from train.sample import main
    out = run / "limit"
    assert main(sample_args(run, out, "--bucket", "32x64_t9", "--limit", "2", "--index", "1")) == 0
    keys = sorted(p.name for p in out.iterdir())
    shard_keys = sorted(p.name.split(".")[0] for p in (run / "shards/val/32x64_t9").glob("*.tar"))
    assert len(keys) == 2 and len(shard_keys) == 2  # 3 samples in 2 shards; index 1 and 2 of tar order
    for key in keys:
        info = json.loads((out / key / "sample.json").read_text())
        assert info["key"] == key and info["steps"] == 2 and info["frames"] == [3, 9, 32, 64, 3]
        for name in VIEWS:
            assert mp4_frames(out / key / f"{name}.mp4").shape == (9, 32, 64, 3)
        assert (out / key / "grid.mp4").is_file() and (out / key / "contact_sheet.png").is_file()
        assert load_file(str(out / key / "latents.safetensors"))["latents"].shape == (3, 16, 3, 4, 8)
    a, b = (load_file(str(out / k / "latents.safetensors"))["latents"] for k in keys)
    assert float((a - b).abs().max()) > 1e-3  # same seed, other conditions: other clips


# ---- CogVAE decode, tiled ---------------------------------------------------------------------

def test_decode_tile_must_keep_diffusers_strides_in_step(run):
    """diffusers crops each tile to tile - int(tile * overlap) px but steps int(tile / 8 * (1 - overlap))
    latents: when the two disagree the decoded frame has the wrong size. The check refuses such tiles;
    a tile that keeps them in step decodes to exactly 8x the latent size, and does tile."""
    from diffusers import AutoencoderKLCogVideoX
    from pipeline.contract import cli
    from train.vaedecode import DecodeConfig, decode_latents, load_decoder
    lat = torch.randn(1, 16, 1, 12, 20, generator=torch.Generator().manual_seed(0))     # 96 x 160 px
    with pytest.raises(cli.BadInput, match="stride"):
        DecodeConfig(tile_height=32, tile_width=56, tile_overlap=0.25).check()          # width 56: 42 px vs 5 latents
    raw = AutoencoderKLCogVideoX.from_pretrained(str(run / "vae"), local_files_only=True).eval()
    raw.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=56, tile_overlap_factor_height=0.25,
                      tile_overlap_factor_width=0.25)
    with torch.no_grad():
        assert raw.decode(lat).sample.shape[-1] != 160                                  # what the check prevents
    good = DecodeConfig(tile_height=32, tile_width=64, tile_overlap=0.25)
    vae = load_decoder(str(run / "vae"), "cpu", good)
    assert vae.use_tiling and vae.tile_latent_min_width == 8
    tiled = decode_latents(vae, lat, 1.0)
    whole = decode_latents(str(run / "vae"), lat, 1.0, cfg=DecodeConfig(tiling=False))
    assert tiled.shape == whole.shape == (1, 1, 96, 160, 3)
    assert not np.array_equal(tiled, whole)                                             # it did decode in tiles


# ---- sequence parallel (slow: torchrun) ----------------------------------------------------

@pytest.mark.slow
def test_sp2_under_torchrun_gives_the_sp1_video(run):
    """Two processes, one SP group: the tokens of each clip split over 2 ranks, the views decoded
    between them and gathered. Same latents as one process (float tolerance), same video."""
    from train.sample import main
    one, two = run / "sp1", run / "sp2"
    assert main(sample_args(run, one, "--bucket", "32x64_t9", "--limit", "2", "--png")) == 0
    torchrun(2, "train.sample", *sample_args(run, two, "--bucket", "32x64_t9", "--limit", "2", "--sp", "2", "--png"))
    keys = sorted(p.name for p in one.iterdir())
    assert keys == sorted(p.name for p in two.iterdir()) and len(keys) == 2
    for key in keys:
        a = load_file(str(one / key / "latents.safetensors"))["latents"]
        b = load_file(str(two / key / "latents.safetensors"))["latents"]
        assert float(a.abs().max()) > 0.5
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        assert json.loads((two / key / "sample.json").read_text())["sp"] == 2
        for name in VIEWS:  # every view, also the one decoded on rank 1 (the PNGs: H.264 turns a 1-level
            # difference of one pixel into tens of levels around it, so the mp4s only get their shape checked)
            fa, fb = read_pngs(one / key / "frames" / name), read_pngs(two / key / "frames" / name)
            assert fa.shape == fb.shape == (9, 32, 64, 3)
            diff = np.abs(fa.astype(int) - fb.astype(int))
            assert diff.max() <= 2 and diff.mean() < 0.05, (name, diff.max(), diff.mean())
            assert mp4_frames(two / key / f"{name}.mp4").shape == fa.shape
