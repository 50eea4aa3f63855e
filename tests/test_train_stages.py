"""Stage transitions in the trainer: --init-from loads weights only (fresh step, optimizer,
warm-up, EMA from the loaded weights), the stage-2 first step computes stage 1's loss."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.config import ModelConfig
from model.registry import build_from_config
from tests.factories import write_shards
from tests.factories_train import STAGE_TWO_BUCKETS, TEST_VIEWS
from tests.factories_train import train_config as config
from train import checkpoint as ckpt
from train.config import TrainConfig
from train.data import BatchStream, find_shards
from train.train import TextSource, compute_loss, main, seed_step, step_rng, train

STAGE = STAGE_TWO_BUCKETS
from model.registry import STAGE1_OVERRIDES as SPATIAL  # noqa: E402  (the authors' stage-1 model)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("stages")
    write_shards(root / "shards", {(32, 64, 1): 8, (32, 64, 9): 4}, per_shard=2, views=TEST_VIEWS,
                 num_boxes=3)
    (root / "stage.yaml").write_text(STAGE)
    from model.text import T5TextEncoder, TextEmbeddingCache, read_captions, write_tiny_t5
    write_tiny_t5(root / "t5")
    TextEmbeddingCache(root / "text_cache").build(read_captions(str(root / "shards")),
                                                  T5TextEncoder(root / "t5", max_length=16), progress=False)
    train(config(root, "s1", 4, model_overrides=dict(SPATIAL), warmup=0), progress=False)
    train(stage2_config(root), progress=False)
    return root


def stage2_config(root: Path) -> TrainConfig:
    return config(root, "s2", 2, seed=5, model_overrides={}, init_from=str(root / "s1"),
                  ema_decay=1.0)




def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_stage2_first_step_loss_equals_stage1_final_weights(runs):
    cfg = stage2_config(runs)
    log = _log(runs / "s2")
    assert [r["step"] for r in log] == [1, 2]                               # the step starts fresh
    assert log[0]["lr"] == pytest.approx(2e-3 / 3)                          # and so does the warm-up
    assert ckpt.load_state(runs / "s2")["step"] == 2
    shard = load_file(str(next((ckpt.resolve(runs / "s2") / ckpt.SHARDED).glob("*.safetensors"))))
    assert any(k.startswith("optim.") and k.endswith(".exp_avg") for k in shard)   # the optimizer state is there
    # stage 1's final weights on stage 2's first batch, with stage 2's draws of that step
    src = ckpt.resolve(runs / "s1")
    s1 = build_from_config(ckpt.load_config(src)["model"])
    s1.load_state_dict(ckpt.load_weights(src, "model"))
    assert s1.config.temporal is False
    stream = BatchStream(find_shards(cfg.data, cfg.data.split, cfg.data.shards), cfg.data, cfg.seed, 0, 1,
                         start_step=0, stop_step=1)
    batch = next(iter(stream))
    seed_step(cfg.seed, 0, 0)
    text = TextSource(cfg.data.text_cache, None, cfg.data.text_max_length)
    with torch.no_grad():
        want = float(compute_loss(s1.train(), batch, text, cfg, step_rng(cfg.seed, 0, 0), torch.device("cpu"),
                                  False))
    assert log[0]["bucket"] == batch.bucket
    assert log[0]["loss"] == pytest.approx(want, rel=1e-5, abs=1e-7)
    # EMA starts from the loaded weights (decay 1.0 keeps it there): the spatial blocks load by key,
    # the inserted temporal blocks are identities (zero output projections)
    ema = load_file(str(ckpt.resolve(runs / "s2") / "ema.safetensors"))
    w1 = ckpt.load_weights(src, "model")
    assert torch.equal(ema["base_blocks_s.1.attn.qkv.weight"], w1["base_blocks_s.1.attn.qkv.weight"])
    assert not ema["base_blocks_t.0.attn.proj.weight"].any() and not ema["base_blocks_t.1.mlp.fc2.weight"].any()
    assert "base_blocks_t.0.attn.qkv.weight" not in w1
    assert ModelConfig.from_dict(ckpt.load_config(runs / "s2")["model"]).temporal is True


def test_cli_init_from_and_its_errors(runs, capsys):
    base = ["--set", f"data.root={runs / 'shards'}", "--set", f"data.stage={runs / 'stage.yaml'}",
            "--set", f"data.text_cache={runs / 'text_cache'}", "--set", "data.text_max_length=16",
            "--set", "data.samples_per_chunk=6", "--set", "val_every=0", "--no-progress"]
    s2 = runs / "cli_s2"
    assert main(["--init-from", str(runs / "s1"), "--out", str(s2), "--steps", "1",
                 "--set", "model_overrides={}", *base]) == 0
    assert "init-from" in capsys.readouterr().err
    assert json.loads((s2 / "config.json").read_text())["init_from"] == str(ckpt.resolve(runs / "s1"))
    # going back to a spatial-only model drops the trained temporal blocks: refused, then allowed
    back = ["--init-from", str(s2), "--out", str(runs / "cli_back"), "--steps", "1",
            "--set", "model_overrides={temporal: false, control_temporal: false}", *base]
    assert main(back) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "--init-allow-drop" in err[-1]
    assert main([*back, "--init-allow-drop"]) == 0
    for bad in (["--init-from", str(runs / "s1"), "--resume", str(runs / "s1")],
                ["--init-from", str(runs / "nowhere")]):
        assert main([*bad, "--out", str(runs / "x"), *base]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error:")


def test_stage_check_recomputes_the_previous_stage_on_the_first_batch(runs, capsys):
    from train.stage_check import main as check
    assert check(["--prev", str(runs / "s1"), "--next", str(runs / "s2")]) == 0
    r = json.loads((runs / "s2" / "stage_check.json").read_text())
    assert r["ok"] and abs(r["rel_diff"]) < 1e-5 and r["prev_final_same_batch"] == pytest.approx(r["next_first"])
    assert r["bucket"] == _log(runs / "s2")[0]["bucket"] and "rel_diff_smoothed" in r
    assert "stage check ok" in capsys.readouterr().out
    # a first step that did not start where stage 1 ended is caught (the logged loss 1.5x off)
    import shutil
    shutil.copytree(runs / "s2", runs / "s2_off")
    log = _log(runs / "s2_off")
    log[0]["loss"] *= 1.5
    (runs / "s2_off" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    assert check(["--prev", str(runs / "s1"), "--next", str(runs / "s2_off")]) == 1
    assert "FAILED" in capsys.readouterr().out
    # only against the checkpoint the run was started from, and on the bucket asked for
    for bad, msg in ((["--prev", str(runs / "s2"), "--next", str(runs / "s2")], "was not started with --init-from"),
                     (["--prev", str(runs / "s1"), "--next", str(runs / "s2"), "--bucket", "nope_t1"], "not nope_t1")):
        with pytest.raises(SystemExit) as e:
            check(bad)
        assert e.value.code == 2 and msg in capsys.readouterr().err
