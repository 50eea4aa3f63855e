"""train/train.py and train/sample.py end to end with the tiny MVDiT on factory shards (CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.factories import write_shards
from tests.factories_train import STAGE_TWO_BUCKETS, TEST_VIEWS
from tests.factories_train import train_config as config
from train import checkpoint as ckpt
from train.config import TrainConfig
from train.train import lr_at, train

REPO = Path(__file__).resolve().parents[1]
STAGE = STAGE_TWO_BUCKETS
VIEWS = TEST_VIEWS


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    write_shards(root / "shards", {(32, 64, 1): 8, (32, 64, 9): 4}, per_shard=2, views=VIEWS, num_boxes=3)
    write_shards(root / "shards", {(32, 64, 1): 4, (32, 64, 9): 2}, split="val", per_shard=2, views=VIEWS,
                 num_boxes=3, seed=99)
    (root / "stage.yaml").write_text(STAGE)
    # a caption cache, so the trainer processes never import transformers (fast torchrun start)
    from model.text import T5TextEncoder, TextEmbeddingCache, read_captions, write_tiny_t5
    write_tiny_t5(root / "t5")
    TextEmbeddingCache(root / "text_cache").build(read_captions(str(root / "shards")),
                                                  T5TextEncoder(root / "t5", max_length=16), progress=False)
    return root




def test_train_then_resume_equals_uninterrupted(data):
    torch.set_num_threads(1)
    train(config(data, "full", 6), progress=False)
    train(config(data, "half", 3), progress=False)
    # the CLI path: --resume with no value = the latest checkpoint of --out, with the checkpoint's own config
    from train.train import main
    assert main(["--out", str(data / "half"), "--resume", "--steps", "6", "--no-progress"]) == 0
    a, b = ckpt.resolve(data / "full"), ckpt.resolve(data / "half")
    assert a.name == b.name == "step-0000006"
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f"{name} differs after resume"
    assert ckpt.load_state(a)["step"] == ckpt.load_state(b)["step"] == 6
    # the whole training state, as the sharded checkpoint holds it (one shard file at world 1)
    sa, sb = ({k: v for f in sorted((d / ckpt.SHARDED).glob("*.safetensors")) for k, v in load_file(str(f)).items()}
              for d in (a, b))
    assert sa.keys() == sb.keys() and any(k.startswith("optim.") and k.endswith("exp_avg_sq") for k in sa)
    assert {k.split(".")[0] for k in sa} == {"model", "ema", "optim"}
    assert all(torch.equal(sa[k], sb[k]) for k in sa), "the sharded state differs after resume"
    conf = ckpt.load_config(a)
    assert conf["train"]["steps"] == 6 and conf["model"]["hidden"] == 64  # the checkpoint carries its config
    log = [json.loads(line) for line in (data / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
    assert {"loss", "bucket", "loss_by_bucket", "samples_per_s", "latent_tokens_per_s", "lr", "batch", "drop_all",
            "drop_frames"} <= set(log[0])
    # the resumed run's log has each step once, the same records as the uninterrupted one's
    log_b = [json.loads(line) for line in (data / "half" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_b] == list(range(1, 7))
    assert [(r["loss"], r["drop_all"], r["drop_frames"]) for r in log_b] == [
        (r["loss"], r["drop_all"], r["drop_frames"]) for r in log]
    # the smoothed per-bucket losses go on across --resume (their state is in the checkpoint's state.json)
    assert log_b[-1]["loss_by_bucket"] == pytest.approx(log[-1]["loss_by_bucket"], rel=1e-12)
    assert log_b[3]["loss_by_bucket"].keys() == log[3]["loss_by_bucket"].keys()
    assert log[0]["lr"] == pytest.approx(2e-3 / 3)  # linear warm-up


def test_warmup_then_constant():
    cfg = TrainConfig(lr=1e-4, warmup=3000)
    assert lr_at(cfg, 0) == pytest.approx(1e-4 / 3000)
    assert lr_at(cfg, 1499) == pytest.approx(0.5e-4)
    assert lr_at(cfg, 2999) == lr_at(cfg, 10**6) == pytest.approx(1e-4)


@pytest.mark.slow
def test_tiny_model_loss_decreases(data):
    torch.set_num_threads(1)
    cfg = config(data, "learn", 40, lr=3e-3, warmup=5, val_every=40, val_batches=4)
    cfg.data.val_split = "train"  # fit the training clips: the loss must fall on them
    train(cfg, progress=False)
    log = [json.loads(line) for line in (data / "learn" / "log.jsonl").read_text().splitlines()]
    first = np.mean([r["loss"] for r in log[:5]])
    last = np.mean([r["loss"] for r in log[-5:]])
    assert last < 0.85 * first, (first, last)
    assert log[-1]["val_loss"] < 0.85 * first
    # the log shows the CFG drops actually applied: ~15 % of the samples with everything dropped
    n, dropped = sum(r["batch"] for r in log), sum(r["drop_all"] for r in log)
    assert abs(dropped / n - 0.15) < 4 * (0.15 * 0.85 / n) ** 0.5, (dropped, n)
    frames = sum(r["drop_frames"] for r in log if r["bucket"].endswith("_t9"))
    kept = sum(r["batch"] - r["drop_all"] for r in log if r["bucket"].endswith("_t9"))
    assert frames == 2 * kept     # int(0.4 * (9 - 2)) = 2 interior frames of every 9-frame sample kept


@pytest.mark.slow
def test_sample_writes_videos_and_contact_sheet(data):
    from pipeline.shards.vae import write_tiny_vae
    from train.sample import main as sample_main
    if not (data / "full").exists():
        train(config(data, "full", 2), progress=False)
    write_tiny_vae(data / "vae")
    out = data / "samples"
    assert sample_main(["--ckpt", str(data / "full"), "--vae", str(data / "vae"), "--out", str(out),
                        "--bucket", "32x64_t9", "--steps", "3"]) == 0
    for name in VIEWS:
        with av.open(str(out / f"{name}.mp4")) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert len(frames) == 9 and frames[0].shape == (32, 64, 3)
    with av.open(str(out / "grid.mp4")) as c:
        g = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(g) == 9 and g[0].shape == (32, 3 * 64, 3)  # 3 views -> one row of 3
    sheet = np.asarray(Image.open(out / "contact_sheet.png"))
    from pipeline.tools.panels import readable_scale
    s = readable_scale(64)   # a readable size: each view >= 320 px wide, labelled above, a legend on top
    assert sheet.shape[1] == 3 * (64 * s + 2) and sheet.shape[0] > 32 * s
    info = json.loads((out / "sample.json").read_text())
    assert info["steps"] == 3 and info["weights"] == "ema"
    # a length no bucket had: 13 frames from the 9-frame sample (conditions held on the last frame)
    out13 = data / "samples13"
    assert sample_main(["--ckpt", str(data / "full"), "--vae", str(data / "vae"), "--out", str(out13),
                        "--bucket", "32x64_t9", "--steps", "2", "--frames", "13"]) == 0
    with av.open(str(out13 / f"{VIEWS[0]}.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 13
    info = json.loads((out13 / "sample.json").read_text())
    assert info["frames"][1] == 13 and info["source_frames"] == 9 and info["length_rule"] == "hold"


def test_sample_refuses_a_length_that_is_not_4k_plus_1(data, capsys):
    from train.sample import main as sample_main
    assert sample_main(["--ckpt", str(data), "--vae", str(data), "--out", str(data / "x"), "--frames", "11"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --frames 11") and "9 or 13" in err[0]


def test_sample_conditions_come_from_any_url_form(data):
    """train.sample reads its conditioning sample through the trainer's URL layer: a pipe: URL gives the same sample."""
    from train.sample import first_sample
    cfg = config(data, "urls", 1)
    local, meta = first_sample(cfg, "val", "32x64_t9", 1)
    shards = sorted(str(p) for p in (data / "shards" / "val" / "32x64_t9").glob("*.tar"))
    cfg.data.val_shards = [f"pipe:cat {p}" for p in shards]
    piped, meta2 = first_sample(cfg, "val", "32x64_t9", 1)
    assert meta2 == meta and piped["key"] == local["key"]
    assert np.array_equal(piped["latent_mean"], local["latent_mean"]) and np.array_equal(piped["bev"], local["bev"])
    with pytest.raises(IndexError, match="out of range"):
        first_sample(cfg, "val", "32x64_t9", 99)
