"""model/memory.py: the static count is exact, the calibration predicts the saved tensors of a
model it was not measured on, SP divides what it should, the stored coefficients belong to
today's model, and every stage bucket fits 8 x 80 GB (issue 20's done-when)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import memory
from model.registry import build_model, count_parameters

REPO = Path(__file__).resolve().parents[1]


def test_static_bytes_per_sharding():
    facts = memory.model_facts("tiny")
    model = build_model("tiny")
    P = count_parameters(model)
    assert facts["params"] == P
    from model.parallel import block_units
    units = block_units(model)
    assert facts["root_params"] == P - sum(count_parameters(u) for u in units)
    assert facts["max_unit_params"] == max(count_parameters(u) for u in units)
    assert memory.static_bytes(facts, 1, "none") == memory.static_bytes(facts, 8, "ddp") == 22 * P
    # FSDP2 over 8: fp32 weights, grads, AdamW moments, EMA sharded; root whole in bf16; two units in flight
    w8 = memory.static_bytes(facts, 8, "fsdp")
    assert w8 == 20 * P / 8 + 2 * facts["root_params"] + 10 * facts["max_unit_params"]
    assert memory.static_bytes(facts, 8, "fsdp", reshard_after_forward=False) == w8 + 2 * (P - facts["root_params"])
    assert memory.static_bytes(facts, 32, "fsdp") < w8


def _measured(preset, overrides, views, frames, h, w, ck):
    torch.manual_seed(0)
    model = build_model(preset, **overrides).to(torch.bfloat16).train()
    model.enable_gradient_checkpointing(ck)
    x, t, cond = memory._inputs(model, views, frames, h, w, 8, 4, 200, seed=5)
    return memory.measure_saved_bytes(model, x, t, cond)


@pytest.mark.parametrize("overrides", [{}, {"temporal": False, "control_temporal": False}])
def test_calibration_predicts_the_saved_tensors_of_the_whole_model(overrides):
    """Coefficients measured on one block pair predict the full model (2 pairs + ControlNet) on
    another shape (3 views, 9 frames, 12 x 20 latent), with and without checkpointing."""
    torch.set_num_threads(1)
    coef = memory.calibrate("tiny", overrides, text_len=8, boxes=4, cells=200)
    full = {**overrides, "control_depth": 2}
    facts = memory.model_facts("tiny", full)
    for ck in (False, True):
        got = _measured("tiny", full, 3, 9, 12, 20, ck)
        want = memory.saved_bytes(coef, facts, 1, 12 * 8, 20 * 8, 9, ck, views=3)
        assert abs(want / got - 1) < 0.05, (ck, want, got)
    # checkpointing keeps a bf16 residual per block: 2 bytes a token per unit of width
    assert all(abs(c["a"] - 2.0) < 0.05 for c in coef["ckpt"]["blocks"].values())
    assert all(c["a"] > 30 for c in coef["full"]["blocks"].values())
    if overrides:   # spatial blocks only: the kinds say so
        assert all("temporal=False" in k for k in facts["kinds"])


def test_sequence_parallel_divides_the_per_token_terms():
    coef = json.loads(memory.CALIBRATION.read_text())
    key = next(k for k in coef if k.startswith("paper|") and "temporal" not in k)
    c = coef[key]["coefficients"]
    facts = memory.model_facts("paper", json.loads(key.split("|")[1]))
    for ck in (False, True):
        one = memory.activation_bytes(c, facts, 1, 848, 1600, 17, 1, ck)
        two = memory.activation_bytes(c, facts, 1, 848, 1600, 17, 2, ck)
        four = memory.activation_bytes(c, facts, 1, 848, 1600, 17, 4, ck)
        assert one[1] == 2 * two[1] == 4 * four[1] == 6 * 5 * 5300   # 5300 tokens per view-frame, split evenly
        assert 0.45 < two[0] / one[0] < 0.56 and 0.22 < four[0] / one[0] < 0.3   # the rest is replicated
    # 424 x 800: 27 x 50 = 1350 tokens per view-frame; SP=4 pads each rank to ceil(1350 / 4) = 338
    assert memory.activation_bytes(c, facts, 1, 424, 800, 1, 4)[1] == 6 * 338
    assert memory.activation_bytes(c, facts, 1, 424, 800, 9, 1, True)[0] < memory.activation_bytes(
        c, facts, 1, 424, 800, 9, 1, False)[0]


def test_the_stored_coefficients_are_of_todays_model_and_refuse_another():
    rows = memory.plan()    # raises memory.Uncalibrated if the network changed since the calibration
    assert {r["stage"] for r in rows} == {"stage1", "stage2", "stage3"}
    table = json.loads(memory.CALIBRATION.read_text())
    for entry in table.values():
        entry["fingerprint"] = "0" * 16
    with pytest.raises(memory.Uncalibrated, match="python -m model.memory calibrate"):
        memory.plan(table=table)


def test_every_stage_bucket_fits_8_gpus_of_80_gb():
    rows = memory.plan(gpus=8, gpu_gb=80)
    assert len(rows) == 1 + 9 + 12
    for r in rows:
        assert r["sp"] * r["dp"] == 8 and r["sp"] <= 4
        assert r["peak_gb"] <= 72 and r["fits"] is not None and r["fits"] <= r["sp"], r
    stage3 = [r for r in rows if r["stage"] == "stage3"]
    assert {r["sp"] for r in stage3} == {4}          # train/configs/stage3.yaml: sp 4
    # more SP never costs more per GPU
    for r in rows:
        v = [r["peak_gb_by_sp"][s] for s in ("1", "2", "4")]
        assert v[0] >= v[1] >= v[2]


def test_cli_json():
    r = subprocess.run([sys.executable, "-m", "model.memory", "--json", "--gpus", "4", "--gpu-gb", "80"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout)
    assert rows and all({"stage", "bucket", "batch", "sp", "dp", "peak_gb", "fits"} <= set(x) for x in rows)
    assert all(x["sp"] * x["dp"] == 4 for x in rows)
    bad = subprocess.run([sys.executable, "-m", "model.memory", "--gpus", "0"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "--gpus" in bad.stderr
