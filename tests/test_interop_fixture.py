"""The parity fixtures made from the authors' code (tests/data/magicdrivedit, FORMAT.md there) are
complete and self-consistent. Needs none of their code. The numeric parity test (this project's MVDiT
against these outputs) is the model's own; this file only guards the fixture it reads.

Each check is a function that raises AssertionError; the tests run it on the real fixture and on a
damaged copy, so a check that cannot fail would show."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from model.interop.fixture_io import decode_args, load

FOLDER = Path(__file__).parent / "data" / "magicdrivedit"
FILES = ("FORMAT.md", "fixture.json", "config.json", "weights.safetensors", "cases.safetensors", "stage3_keys.json")
CALL_ARGS = ("x", "timestep", "y", "mask", "maps", "bbox/bboxes", "bbox/classes", "bbox/masks", "bbox/box_latent",
             "cams", "rel_pos", "fps", "height", "width", "num_frames", "drop_cond_mask", "drop_frame_mask")
TOLERANCE = 1e-4  # the parity test's max |ours - theirs| / max |theirs|


@pytest.fixture(scope="module")
def fx():
    meta, weights, tensors = load(FOLDER)
    return meta, weights, tensors


def pattern(key: str) -> str:
    return re.sub(r"(blocks_[st])\.\d+\.", r"\1.*.", key)


# ---- the checks ------------------------------------------------------------------------------------------
def check_complete(meta: dict, tensors: dict) -> None:
    """Every case has every input of a call and an output; every stored tensor belongs to an entry."""
    used = set()
    entries = dict(meta["cases"], sample=meta["sample"])
    assert set(meta["cases"]) >= {"video", "image", "odd_height", "drop", "cfg_pair", "x_mask"}
    for name, e in entries.items():
        required = set(CALL_ARGS) - ({"x", "timestep"} if name == "sample" else set())
        assert required <= set(e["args"]), f"{name}: missing {sorted(required - set(e['args']))}"
        assert set(e["values"]) == {"mv_order_map", "t_order_map"}, name
        for arg, a in e["args"].items():
            assert a["key"] in tensors, f"{name}/{arg}: {a['key']} not stored"
            assert str(tensors[a["key"]].dtype).removeprefix("torch.") == a["stored_dtype"], (name, arg)
            if a["encoding"] in ("none", "fp16"):
                assert list(tensors[a["key"]].shape) == a["shape"], (name, arg)
            used.add(a["key"])
        outs = [e["output"]] + ([e["noise"], e["timesteps"]] if name == "sample" else [])
        for o in outs:
            assert o["key"] in tensors, f"{name}: {o['key']} not stored"
            assert list(tensors[o["key"]].shape) == o["shape"], (name, o["key"])
            used.add(o["key"])
    assert used == set(tensors), f"tensors no entry names: {sorted(set(tensors) - used)[:5]}"


def check_shapes(meta: dict, tensors: dict, name: str) -> None:
    """The decoded call of one case agrees with the model config and the case's spec (FORMAT.md table)."""
    kw, e = meta["model"]["kwargs"], (meta["sample"] if name == "sample" else meta["cases"][name])
    spec, a = e["spec"], decode_args(tensors, e)
    V, B, T, (H, W) = len(meta["views"]), spec["B"], spec["T"], spec["size"]
    pair = 2 if spec.get("pair") else 1
    Bc, Tl, G, N = B * pair, (T - 1) // 4 + 1, 200 if H < 424 else 400, max(spec["boxes"])
    assert len(a["mv_order_map"]) == V and all(len(n) == 2 for n in a["mv_order_map"].values())
    latent = (Bc, kw["in_channels"] * V, Tl, H // 8, W // 8)
    out = tensors[e["output"]["key"]]
    if name == "sample":
        assert tuple(tensors[e["noise"]["key"]].shape) == latent and out.shape == latent
        ts = tensors[e["timesteps"]["key"]][:, 0]
        assert ts.shape == (spec["steps"],) and ts[0] == 1000 and bool((ts[1:] < ts[:-1]).all())
    else:
        assert tuple(a["x"].shape) == latent and out.shape == latent, name
        assert a["timestep"].shape == (Bc,) and bool(((a["timestep"] >= 0) & (a["timestep"] <= 1000)).all())
    assert a["y"].shape == (Bc, 1, kw["model_max_length"], kw["caption_channels"])
    assert a["mask"].shape == (B, kw["model_max_length"])
    assert a["maps"].shape == (Bc, T, kw["map_embedder_param"]["conditioning_size"][0], G, G)
    assert set(a["maps"].unique().tolist()) <= {0.0, 1.0}
    box = a["bbox"]
    assert box["bboxes"].shape == (Bc * V, T, N, 8, 3) and box["classes"].shape == (Bc * V, T, N)
    assert box["masks"].shape == (Bc * V, T, N)
    assert box["box_latent"].shape == (Bc * V, T, N, kw["bbox_embedder_param"]["class_token_dim"])
    assert set(box["masks"].unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert set(box["classes"].unique().tolist()) <= set(range(-1, kw["bbox_embedder_param"]["n_classes"]))
    assert a["cams"].shape == (Bc * V, T, 1, 3, 7)
    assert a["rel_pos"].shape == (Bc * V, T, 1, 3 if pair == 2 else 4, 4)
    for k in ("fps", "height", "width", "num_frames"):
        assert a[k].shape == (B,), (name, k)
    assert a["height"].tolist() == [float(H)] * B and a["num_frames"].tolist() == [float(T)] * B
    assert a["drop_cond_mask"].shape == (Bc,) and a["drop_frame_mask"].shape == (Bc, T)
    if "x_mask" in a:
        assert a["x_mask"].shape == (Bc, Tl) and a["x_mask"].dtype == torch.bool
    longest = int(a["mask"].sum(1).max())
    if longest < kw["model_max_length"]:  # their model reads longest + 1 tokens: one more is stored
        assert e["args"]["y"]["tokens"] >= longest + 2, name


def check_weights(meta: dict, weights: dict, config: dict) -> None:
    """weights.safetensors is the tiny model of fixture.json/config.json: counts, widths, dtypes."""
    kw = meta["model"]["kwargs"]
    for k in ("hidden_size", "depth", "control_depth", "num_heads", "in_channels", "caption_channels"):
        assert config[k] == kw[k], k
    h, c = kw["hidden_size"], kw["in_channels"]
    assert weights["x_embedder.proj.weight"].shape == (h, c, *kw["patch_size"])
    assert weights["y_embedder.y_embedding"].shape == (kw["model_max_length"], kw["caption_channels"])
    assert weights["final_layer.linear.weight"].shape == (int(np.prod(kw["patch_size"])) * c, h)
    for group, n in (("base_blocks_s", kw["depth"]), ("base_blocks_t", kw["depth"]),
                     ("control_blocks_s", kw["control_depth"]), ("control_blocks_t", kw["control_depth"])):
        found = {int(k.split(".")[1]) for k in weights if k.startswith(group + ".")}
        assert found == set(range(n)), group
    assert len(weights) == meta["weights"]["count"]
    for k, t in weights.items():
        assert t.dtype == (torch.float32 if k in meta["weights"]["fp32"] else torch.float16), k
    assert set(meta["weights"]["fp32"]) == {k for k in weights if k.endswith("rope.freqs")}


def check_key_list(weights: dict, full: dict) -> None:
    """stage3_keys.json has the tiny state dict's key set pattern for pattern, with the same ranks,
    the stage-3 block counts and a parameter count that adds up."""
    keys = full["keys"]
    assert {pattern(k) for k in keys} == {pattern(k) for k in weights}
    ranks = {pattern(k): len(v["shape"]) for k, v in keys.items()}
    assert all(ranks[pattern(k)] == t.ndim for k, t in weights.items())
    cfg = full["config"]
    for group, n in (("base_blocks_s", cfg["depth"]), ("base_blocks_t", cfg["depth"]),
                     ("control_blocks_s", cfg["control_depth"]), ("control_blocks_t", cfg["control_depth"])):
        assert {int(k.split(".")[1]) for k in keys if k.startswith(group + ".")} == set(range(n)), group
    assert keys["x_embedder.proj.weight"]["shape"] == [cfg["hidden_size"], cfg["in_channels"], *cfg["patch_size"]]
    assert full["parameters"] == sum(int(np.prod(v["shape"])) for v in keys.values() if v["kind"] == "parameter")


def check_values(meta: dict, tensors: dict) -> None:
    """Everything finite; every output non-zero and distinct from its input."""
    for k, t in tensors.items():
        if t.is_floating_point():
            assert bool(torch.isfinite(t).all()), k
    for name, e in meta["cases"].items():
        out = tensors[e["output"]["key"]]
        assert float(out.std()) > 0.1, name
        assert not torch.allclose(out, tensors[e["args"]["x"]["key"]].float()), name
    assert not torch.allclose(tensors["sample/output"], tensors["sample/noise"].float())


def check_sensitivity(meta: dict, weights: dict) -> None:
    """Zeroing any one key pattern moves the drop case's output past twice the parity tolerance."""
    rel = meta["sensitivity"]["rel_change"]
    assert set(rel) == {pattern(k) for k in weights if not k.endswith("rope.freqs")}
    weak = {k: v for k, v in rel.items() if v <= 2 * TOLERANCE}
    assert not weak, weak


def check_conditioning(meta: dict) -> None:
    """The fixture network is well conditioned: its own fp32 output differs from the same call in fp64
    (`fp64_rel_diff`) by far less than the tightest parity bound (TOLERANCE / 10, their attention
    arithmetic), for every case and after the sampling loop, so parity holds on any machine's BLAS."""
    entries = dict(meta["cases"], sample=meta["sample"])
    diffs = {name: e.get("fp64_rel_diff") for name, e in entries.items()}
    assert all(isinstance(d, float) for d in diffs.values()), diffs
    loose = {name: d for name, d in diffs.items() if not 0 <= d <= TOLERANCE / 20}
    assert not loose, loose


def check_cfg_pair(meta: dict, weights: dict, tensors: dict) -> None:
    """cfg_pair is their add_null_condition layout: [cond, null] with null boxes, learned null camera and
    trajectory, the learned null caption, the map kept, drops off."""
    a = decode_args(tensors, meta["cases"]["cfg_pair"])
    V, tokens = len(meta["views"]), meta["cases"]["cfg_pair"]["args"]["y"]["tokens"]
    null = slice(V, 2 * V)
    for k, t in a["bbox"].items():
        assert not t[null].any(), k
    assert torch.equal(a["cams"][null], weights["camera_embedder.uncond_cam"].float().expand_as(a["cams"][null]))
    assert torch.equal(a["rel_pos"][null], weights["frame_embedder.uncond_cam"].float().expand_as(a["rel_pos"][null]))
    assert torch.equal(a["y"][1, 0, :tokens], weights["y_embedder.y_embedding"][:tokens].float())
    assert torch.equal(a["maps"][0], a["maps"][1]) and torch.equal(a["x"][0], a["x"][1])
    assert bool((a["drop_cond_mask"] == 1).all()) and bool((a["drop_frame_mask"] == 1).all())


def check_drop(meta: dict, tensors: dict) -> None:
    """drop: sample 0 loses every condition (and keeps every text token, as their training loop sets it);
    sample 1 loses the frames of its spec."""
    e = meta["cases"]["drop"]
    a, frames = decode_args(tensors, e), e["spec"]["drop_frames"]["1"]
    assert a["drop_cond_mask"].tolist() == [0.0, 1.0] and not a["drop_frame_mask"][0].any()
    assert bool((a["mask"][0] == 1).all())
    assert sorted(torch.nonzero(a["drop_frame_mask"][1] == 0).flatten().tolist()) == frames


# ---- the tests -------------------------------------------------------------------------------------------
def test_files_present_and_documented():
    missing = [f for f in FILES if not (FOLDER / f).is_file()]
    assert not missing, missing
    doc = (FOLDER / "FORMAT.md").read_text()
    assert all(f in doc for f in FILES[1:]) and all(f"`{e}`" in doc for e in ("none", "fp16", "y_prefix", "packbits"))


def test_every_case_complete(fx):
    meta, _, tensors = fx
    check_complete(meta, tensors)
    broken = dict(tensors)
    broken.pop(meta["cases"]["x_mask"]["output"]["key"])
    with pytest.raises(AssertionError, match="not stored"):
        check_complete(meta, broken)
    no_maps = copy.deepcopy(meta)
    del no_maps["cases"]["drop"]["args"]["maps"]
    with pytest.raises(AssertionError, match="missing"):
        check_complete(no_maps, tensors)


@pytest.mark.parametrize("name", ["video", "image", "odd_height", "drop", "cfg_pair", "x_mask", "sample"])
def test_shapes_agree_with_config(fx, name):
    meta, _, tensors = fx
    check_shapes(meta, tensors, name)


def test_shape_check_catches_a_wrong_view_fold(fx):
    meta, _, tensors = fx
    broken = dict(tensors)
    key = meta["cases"]["video"]["args"]["cams"]["key"]
    broken[key] = tensors[key][:1]  # views not folded into the batch
    bad = copy.deepcopy(meta)
    bad["cases"]["video"]["args"]["cams"]["shape"] = list(broken[key].shape)
    with pytest.raises(AssertionError):
        check_shapes(bad, broken, "video")


def test_weights_are_the_tiny_model(fx):
    meta, weights, _ = fx
    config = json.loads((FOLDER / "config.json").read_text())
    assert config["model_type"] == "MagicDriveSTDiT3"
    check_weights(meta, weights, config)
    with pytest.raises(AssertionError):
        check_weights(meta, {k: v for k, v in weights.items() if not k.startswith("control_blocks_t.1.")}, config)


def test_stage3_key_list_covers_the_tiny_state_dict(fx):
    _, weights, _ = fx
    full = json.loads((FOLDER / "stage3_keys.json").read_text())
    check_key_list(weights, full)
    assert full["config"]["hidden_size"] == 1152 and full["config"]["depth"] == 28
    with pytest.raises(AssertionError):
        check_key_list({**weights, "base_blocks_s.0.extra.weight": torch.zeros(1, 1)}, full)


def test_values_finite_and_outputs_non_zero(fx):
    meta, _, tensors = fx
    check_values(meta, tensors)
    broken = dict(tensors)
    key = meta["cases"]["image"]["output"]["key"]
    broken[key] = torch.zeros_like(tensors[key])
    with pytest.raises(AssertionError):
        check_values(meta, broken)


def test_every_weight_pattern_moves_the_output(fx):
    meta, weights, _ = fx
    check_sensitivity(meta, weights)
    weak = copy.deepcopy(meta)
    weak["sensitivity"]["rel_change"]["base_blocks_s.*.mva_proj.weight"] = 1e-7
    with pytest.raises(AssertionError):
        check_sensitivity(weak, weights)


def test_fixture_network_is_well_conditioned(fx):
    meta, _, _ = fx
    check_conditioning(meta)
    chaotic = copy.deepcopy(meta)
    chaotic["sample"]["fp64_rel_diff"] = 2e-3  # the former fixture's loop
    with pytest.raises(AssertionError):
        check_conditioning(chaotic)
    unmeasured = copy.deepcopy(meta)
    del unmeasured["cases"]["video"]["fp64_rel_diff"]
    with pytest.raises(AssertionError):
        check_conditioning(unmeasured)


def test_cfg_pair_and_drop_layouts(fx):
    meta, weights, tensors = fx
    check_cfg_pair(meta, weights, tensors)
    check_drop(meta, tensors)
    swapped = dict(tensors)  # null half first: the layout of their dpm-solver, not of RFLOW
    key = meta["cases"]["cfg_pair"]["args"]["cams"]["key"]
    swapped[key] = tensors[key].roll(len(meta["views"]), 0)
    with pytest.raises(AssertionError):
        check_cfg_pair(meta, weights, swapped)


def test_box_states_exercised(fx):
    """The cases hold all three of their box mask states (1 seen, 0 none, -1 dropped) and class -1 padding."""
    meta, _, tensors = fx
    seen_masks, padded = set(), False
    for e in meta["cases"].values():
        box = decode_args(tensors, e)["bbox"]
        seen_masks |= set(box["masks"].unique().tolist())
        padded |= bool(((box["classes"] == -1) & (box["masks"] == 0)).any())
    assert seen_masks == {-1.0, 0.0, 1.0} and padded
