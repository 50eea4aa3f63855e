"""MVDiT shapes across buckets, presets/config round trip, describe CLI, input errors, precision."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from model.conditions import Conditions, latent_len, random_conditions
from model.config import ModelConfig
from model.registry import PRESETS, build_from_config, build_model, count_parameters, describe, main
from pipeline.contract import schema

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("tiny").eval()


@pytest.mark.parametrize("frames", [1, 9, 17])
@pytest.mark.parametrize("views,hw", [(6, (8, 16)), (3, (5, 7))])
def test_forward_shapes_across_buckets(tiny, frames, views, hw):
    Tl = latent_len(frames)
    assert Tl == schema.latent_frames(frames)
    g = torch.Generator().manual_seed(frames)
    cond = random_conditions(2, views, frames, text_dim=32, bev_size=200, generator=g)
    x = torch.randn(2, views, 16, Tl, *hw, generator=g)
    with torch.no_grad():
        out = tiny(x, torch.tensor([0.1, 0.9]), cond)
        guided = tiny.guided_velocity(x, torch.tensor([0.1, 0.9]), tiny.draw_box_latent(cond, g))
    assert out.shape == guided.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(guided).all()


@pytest.mark.parametrize("frames", [5, 13])
def test_any_4k_plus_1_length_forward_backward(frames):
    """Lengths no bucket has (4k+1, not 8k+1) train: a gradient reaches every parameter."""
    torch.manual_seed(frames)
    m = build_model("tiny")
    with torch.no_grad():   # zero-initialised projections would stop the gradient of what lies behind them
        for p in m.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(frames)
    cond = random_conditions(2, 2, frames, text_dim=32, bev_size=16, generator=g)
    x = torch.randn(2, 2, 16, latent_len(frames), 4, 4, generator=g)
    drop_frames = torch.zeros(2, frames, dtype=torch.bool)
    drop_frames[0, 1] = True
    out = m(x, torch.tensor([0.5, 0.2]), cond, torch.tensor([False, True]), drop_frames)
    out.square().mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or (p.grad == 0).all()]
    assert not missing, missing


def test_config_round_trip_and_presets():
    for name, cfg in PRESETS.items():
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg, name
    assert PRESETS["paper"] == ModelConfig()   # the authors' stage-3 network is the default
    with pytest.raises(ValueError, match="unknown keys"):
        ModelConfig.from_dict({"hidden": 64, "bogus": 1})
    with pytest.raises(ValueError, match="heads"):
        ModelConfig(hidden=30, heads=4)
    with pytest.raises(ValueError, match="map_branch"):
        ModelConfig(map_branch="bev")
    with pytest.raises(KeyError, match="tiny"):
        build_model("huge")
    torch.manual_seed(0)
    a = build_model("tiny")
    torch.manual_seed(0)
    b = build_from_config(a.config.to_dict())
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)   # same seed -> same weights


def test_initialisation_is_theirs():
    """The zero-inits of their initialize_weights; ControlNet blocks start as copies of the base blocks."""
    torch.manual_seed(0)
    m = build_model("tiny")
    zero = [m.before_proj, m.bbox_embedder.final_proj, m.camera_embedder.after_proj, m.frame_embedder.final_proj]
    zero += [b.mva_proj for b in m.base_blocks_s] + [b.after_proj for b in m.control_blocks_s]
    zero += [b.attn.proj for b in m.base_blocks_t] + [b.cross_attn.proj for b in m.base_blocks_t]
    assert all(not lin.weight.any() and not lin.bias.any() for lin in zero)
    assert m.base_blocks_t[0].mlp.fc2.weight.any()        # their temporal fc2 zero-init is a no-op
    assert m.base_blocks_s[0].scale_shift_table.any()     # randn / sqrt(D), not zero
    assert torch.equal(m.control_blocks_s[0].attn.qkv.weight, m.base_blocks_s[0].attn.qkv.weight)
    assert not m.control_blocks_s[0].cross_view and m.base_blocks_s[0].cross_view


def test_describe_counts_paper_on_meta(capsys):
    d = describe("paper")
    # their MagicDriveSTDiT3-XL/2 stage-3 network: 2.04e9 parameters (their count includes 180 RoPE
    # frequencies kept as parameters; here they are buffers)
    assert d["parameters"]["total"] == 2_036_729_829
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
    with pytest.raises(ValueError, match="boxes"):
        tiny(x, torch.zeros(1), dataclasses.replace(cond, boxes=cond.boxes[:, :, :2]))
    with pytest.raises(ValueError, match="4k\\+1"):
        tiny(x[:, :, :, :2], torch.zeros(1), random_conditions(1, 6, 7, text_dim=32, bev_size=24))
    with pytest.raises(ValueError, match="text_dim=32"):
        tiny(x, torch.zeros(1), random_conditions(1, 6, 9, text_dim=48, bev_size=24))
    moved = cond.to("cpu", dtype=torch.float64)
    assert isinstance(moved, Conditions) and moved.view_boxes.dtype == torch.float64 and moved.fps is None
    assert moved.box_mask.dtype == torch.bool


def test_clip_without_boxes(tiny):
    """N = 0 objects: one null box (their collate's padding box) keeps the keys valid."""
    for frames in (1, 9):
        cond = random_conditions(1, 2, frames, boxes=0, text_dim=32, bev_size=16)
        with torch.no_grad():
            out = tiny(torch.randn(1, 2, 16, latent_len(frames), 2, 4), torch.rand(1), cond)
        assert out.shape == (1, 2, 16, latent_len(frames), 2, 4) and torch.isfinite(out).all()


def test_bf16_autocast_and_checkpointing_match_fp32():
    torch.manual_seed(4)
    m = build_model("tiny")
    cond = random_conditions(1, 2, 9, text_dim=32, bev_size=16, generator=torch.Generator().manual_seed(4))
    cond = m.draw_box_latent(cond, torch.Generator().manual_seed(5))
    x, t = torch.randn(1, 2, 16, 3, 4, 4), torch.tensor([0.4])
    ref = m(x, t, cond)
    m.enable_gradient_checkpointing()
    ck = m(x, t, cond)
    ck.square().mean().backward()
    assert torch.equal(ref, ck) and m.x_embedder.proj.weight.grad is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m(x, t, cond)
    assert low.dtype == torch.float32
    assert (low - ref).abs().max() < 0.05 * ref.abs().max()
