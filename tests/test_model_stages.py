"""Stage transitions of MVDiT (model/stages.py): the authors' stage-1 model (no temporal stacks), temporal
blocks inserted as identities by key, the new per-box latent, refused drops and shape changes."""
from __future__ import annotations

import pytest
import torch

from model.conditions import random_conditions
from model.registry import STAGE1_OVERRIDES, build_model
from model.stages import init_from_state
from tests.factories_train import perturb_zero_init

torch.set_num_threads(1)


def _inputs(T: int, B=2, V=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = random_conditions(B, V, T, boxes=4, text_dim=32, bev_size=32, generator=g)
    x = torch.randn(B, V, 16, (T - 1) // 4 + 1, 4, 6, generator=g)
    return x, torch.rand(B, generator=g), cond


@pytest.fixture(scope="module")
def stage1():
    torch.manual_seed(0)
    return perturb_zero_init(build_model("tiny", **STAGE1_OVERRIDES)).eval()


def test_stage1_model_is_theirs(stage1):
    assert stage1.base_blocks_t is None and stage1.control_blocks_t is None and stage1.bbox_embedder.mean_var is None
    assert all(b.cross_view for b in stage1.base_blocks_s) and not any(b.cross_view for b in stage1.control_blocks_s)


def test_stage2_at_init_equals_stage1_on_images(stage1):
    torch.manual_seed(1)  # another seed than stage 1: nothing may come from a shared init
    stage2 = build_model("tiny").eval()
    report = init_from_state(stage2, stage1.state_dict(), stage1.config)
    assert not report.dropped and report.loaded == len(stage1.state_dict())
    heads = {".".join(k.split(".")[:2]) for k in report.added}
    assert heads == {"base_blocks_t.0", "base_blocks_t.1", "control_blocks_t.0", "bbox_embedder.mean_var"}
    x, t, cond = _inputs(1)
    with torch.no_grad():
        a, b = stage1(x, t, cond), stage2(x, t, cond)
    assert a.abs().mean() > 1e-3
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    # the inserted temporal blocks are real: once their projections train, the output moves
    with torch.no_grad():
        for blk in stage2.base_blocks_t:
            blk.attn.proj.weight.normal_(0, 0.05)
            blk.mlp.fc2.weight.normal_(0, 0.05)
        assert not torch.allclose(stage2(x, t, cond), a, atol=1e-4)


def test_stage2_trains_its_temporal_blocks(stage1):
    stage2 = build_model("tiny")
    init_from_state(stage2, stage1.state_dict(), stage1.config)
    x, t, cond = _inputs(9)
    stage2(x, t, cond).square().mean().backward()
    for blk in stage2.base_blocks_t:   # zero output projections get a gradient: the identity can open
        assert blk.attn.proj.weight.grad.abs().sum() > 0 and blk.mlp.fc2.weight.grad.abs().sum() > 0


def test_dropping_modules_is_refused_unless_asked(stage1):
    stage2 = perturb_zero_init(build_model("tiny"))
    back = build_model("tiny", **STAGE1_OVERRIDES)
    with pytest.raises(ValueError, match="init-allow-drop"):
        init_from_state(back, stage2.state_dict(), stage2.config)
    report = init_from_state(back, stage2.state_dict(), stage2.config, allow_drop=True)
    assert any(k.startswith("base_blocks_t.1.") for k in report.dropped) and not report.added
    assert torch.equal(back.base_blocks_s[1].attn.qkv.weight, stage2.base_blocks_s[1].attn.qkv.weight)


def test_shape_mismatch_is_refused(stage1):
    other = build_model("tiny", hidden=96, heads=4, **STAGE1_OVERRIDES)
    with pytest.raises(ValueError, match="shapes differ"):
        init_from_state(other, stage1.state_dict(), stage1.config)
