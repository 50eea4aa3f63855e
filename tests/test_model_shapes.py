"""MVDiT shapes across buckets, presets/config round trip, describe CLI, input errors."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from model.conditions import CONDITION_NAMES, Conditions, latent_len, random_conditions
from model.config import ModelConfig
from model.registry import PRESETS, build_from_config, build_model, count_parameters, describe, main
from pipeline.contract import schema
from tests.factories_train import perturb_zero_init

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("tiny").eval()




@pytest.mark.parametrize("frames", [1, 9, 17, 33])
@pytest.mark.parametrize("views,hw", [(6, (8, 16)), (3, (5, 7))])
def test_forward_shapes_across_buckets(tiny, frames, views, hw):
    Tl = latent_len(frames)
    assert Tl == schema.latent_frames(frames) and Tl in (1, 3, 5, 9)
    g = torch.Generator().manual_seed(frames)
    cond = random_conditions(2, views, frames, text_dim=32, bev_size=40, generator=g)
    assert cond.view_boxes.shape == (2, frames, views, 4, 7) and cond.cam2lidar.shape == (2, frames, views, 4, 4)
    x = torch.randn(2, views, 16, Tl, *hw, generator=g)
    with torch.no_grad():
        out = tiny(x, torch.tensor([0.1, 0.9]), cond)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("frames", [5, 13])
def test_any_4k_plus_1_length_forward_backward(frames):
    """Lengths no bucket has (4k+1 but not 8k+1) train: forward, backward, a gradient everywhere."""
    torch.manual_seed(frames)
    m = perturb_zero_init(build_model("tiny"))
    g = torch.Generator().manual_seed(frames)
    cond = random_conditions(1, 2, frames, text_dim=32, bev_size=16, generator=g)
    x = torch.randn(1, 2, 16, latent_len(frames), 4, 4, generator=g)
    out = m(x, torch.tensor([0.5]), cond)
    assert out.shape == x.shape and latent_len(frames) == (frames - 1) // 4 + 1
    out.square().mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    assert m.boxes.st.merge.weight.grad.abs().sum() > 0 and m.camera.merge.weight.grad.abs().sum() > 0


def test_odd_latent_is_padded_and_cropped():
    # with a trained-looking (non-zero) final layer the output must still be the input's size,
    # and the padded row must not leak: outputs for H'=5 equal the first 5 rows of nothing else
    torch.manual_seed(1)
    m = perturb_zero_init(build_model("tiny")).eval()
    cond = random_conditions(1, 2, 1, text_dim=32, bev_size=24, generator=torch.Generator().manual_seed(1))
    x = torch.randn(1, 2, 16, 1, 5, 6)
    with torch.no_grad():
        out = m(x, torch.tensor([0.5]), cond)
    assert out.shape == x.shape and out.abs().sum() > 0


def test_cross_view_ring_reaches_only_neighbours():
    # depth 2 (two spatial blocks) + ring: view 0 reaches views 1, 5 (one hop) and 2, 4 (two hops)
    # but never the opposite view 3; with "all" it does
    g = torch.Generator().manual_seed(2)
    cond = random_conditions(1, 6, 1, text_dim=32, bev_size=24, generator=g)
    x = torch.randn(1, 6, 16, 1, 4, 4, generator=g)
    x2 = x.clone()
    x2[:, 0] += 1.0
    for mode, view3_changes in (("ring", False), ("all", True)):
        torch.manual_seed(3)
        m = perturb_zero_init(build_model("tiny", cross_view=mode)).eval()
        with torch.no_grad():
            d = (m(x, torch.tensor([0.3]), cond) - m(x2, torch.tensor([0.3]), cond)).abs().flatten(2).amax(-1)[0]
        assert d[1] > 1e-4 and d[5] > 1e-4 and d[2] > 1e-6
        assert (d[3] > 1e-6) == view3_changes, (mode, d)


def test_config_round_trip_and_presets():
    for name, cfg in PRESETS.items():
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg, name
    paper = PRESETS["paper"]
    assert (paper.hidden, paper.depth, paper.heads, paper.text_dim) == (1152, 28, 16, 4096)
    with pytest.raises(ValueError, match="unknown keys"):
        ModelConfig.from_dict({"hidden": 64, "bogus": 1})
    with pytest.raises(ValueError, match="heads"):
        ModelConfig(hidden=30, heads=4)
    with pytest.raises(KeyError, match="tiny"):
        build_model("huge")
    torch.manual_seed(0)
    a = build_model("tiny")
    torch.manual_seed(0)
    b = build_from_config(a.config.to_dict())
    assert b.config == a.config and count_parameters(a) == count_parameters(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)   # same seed -> same weights


def test_describe_counts_paper_on_meta(capsys):
    d = describe("paper")
    # STDiT-3-XL/2 backbone alone is ~1.1B; ours adds cross-view attention and a 13-pair ControlNet
    assert 1.0e9 < d["parameters"]["backbone_blocks"] < 1.6e9
    assert d["parameters"]["total"] > d["parameters"]["backbone_blocks"] + d["parameters"]["controlnet"]
    tiny_count = count_parameters(build_model("tiny"))
    assert describe("tiny")["parameters"]["total"] == tiny_count
    assert main(["--describe", "--preset", "tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["parameters"]["total"] == tiny_count


def test_bad_inputs_are_named(tiny):
    cond = random_conditions(1, 6, 9, text_dim=32, bev_size=24)
    x = torch.randn(1, 6, 16, 3, 4, 4)
    with pytest.raises(ValueError, match="latent frames"):
        tiny(x[:, :, :, :2], torch.zeros(1), cond)
    with pytest.raises(ValueError, match="intrinsics"):
        tiny(x[:, :3], torch.zeros(1), cond)
    with pytest.raises(ValueError, match=r"cam2lidar: expected shape \(1, 9, 6, 4, 4\)"):
        tiny(x, torch.zeros(1), dataclasses.replace(cond, cam2lidar=cond.cam2lidar[:, 0]))  # schema 1.x static rig
    with pytest.raises(ValueError, match="view_boxes"):
        tiny(x, torch.zeros(1), dataclasses.replace(cond, view_boxes=cond.view_boxes[:, :, 0]))
    with pytest.raises(ValueError, match="unknown condition"):
        tiny(x, torch.zeros(1), cond, drop={"txt": torch.tensor([True])})
    with pytest.raises(ValueError, match=r"drop\['boxes'\]"):
        tiny(x, torch.zeros(1), cond, drop={"boxes": torch.tensor([True, False])})
    with pytest.raises(ValueError, match="4k\\+1"):
        tiny(x[:, :, :, :2], torch.zeros(1), random_conditions(1, 6, 7, text_dim=32, bev_size=24))
    with pytest.raises(ValueError, match="text_dim=32"):
        tiny(x, torch.zeros(1), random_conditions(1, 6, 9, text_dim=48, bev_size=24))
    assert set(CONDITION_NAMES) == {"text", "camera", "boxes", "traj", "map"}
    moved = cond.to("cpu", dtype=torch.float64)
    assert isinstance(moved, Conditions) and moved.view_boxes.dtype == torch.float64
    assert moved.box_mask.dtype == torch.bool


def test_clip_without_boxes_and_empty_caption(tiny):
    # N = 0 objects and an all-padding caption still leave valid keys (null slots, cameras, traj)
    for frames in (1, 9):
        cond = random_conditions(1, 2, frames, boxes=0, text_dim=32, bev_size=16)
        cond.text_mask[:] = False
        with torch.no_grad():
            out = tiny(torch.randn(1, 2, 16, latent_len(frames), 2, 4), torch.rand(1), cond)
        assert out.shape == (1, 2, 16, latent_len(frames), 2, 4) and torch.isfinite(out).all()


def test_bf16_autocast_and_checkpointing_match_fp32():
    torch.manual_seed(4)
    m = perturb_zero_init(build_model("tiny"))
    cond = random_conditions(1, 2, 9, text_dim=32, bev_size=16, generator=torch.Generator().manual_seed(4))
    x, t = torch.randn(1, 2, 16, 3, 4, 4), torch.tensor([0.4])
    ref = m(x, t, cond)
    m.enable_gradient_checkpointing()
    ck = m(x, t, cond)
    ck.square().mean().backward()
    assert torch.equal(ref, ck) and m.x_embed.weight.grad is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m(x, t, cond)
    assert low.dtype == x.dtype
    assert (low - ref).abs().max() < 0.05 * ref.abs().max()
