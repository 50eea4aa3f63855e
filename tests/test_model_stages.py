"""Stage transitions of MVDiT (model/stages.py): spatial-only stage 1, temporal blocks inserted as
identities, refused drops, the zero-init cross-view gate, ControlNet copies without cross-view."""
from __future__ import annotations

import pytest
import torch

from model.conditions import random_conditions
from model.registry import build_model
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
    return perturb_zero_init(build_model("tiny", temporal=False, controlnet_cross_view=False)).eval()


def test_spatial_only_model_has_no_temporal_blocks(stage1):
    assert [b.temporal for b in stage1.blocks] == [False, False]
    assert [b.temporal for b in stage1.controlnet.blocks] == [False]
    assert len(stage1.controlnet.out_projs) == 1
    assert all(b.cross_view is not None for b in stage1.blocks)
    assert all(b.cross_view is None for b in stage1.controlnet.blocks)   # controlnet_cross_view: false


@pytest.mark.parametrize("frames", [1, 9, 17])
def test_stage2_at_init_equals_stage1(stage1, frames):
    torch.manual_seed(1)  # another seed than stage 1: nothing may come from a shared init
    stage2 = build_model("tiny", controlnet_cross_view=False).eval()
    report = init_from_state(stage2, stage1.state_dict(), stage1.config)
    assert not report.dropped and report.loaded == len(stage1.state_dict())
    new = {k.split(".")[0] + "." + k.split(".")[1] if k.startswith("blocks.") else ".".join(k.split(".")[:3])
           for k in report.added}
    assert new == {"blocks.1", "blocks.3", "controlnet.blocks.1", "controlnet.out_projs.1"}
    x, t, cond = _inputs(frames)
    with torch.no_grad():
        a, b = stage1(x, t, cond), stage2(x, t, cond)
    assert a.abs().mean() > 1e-3                      # a live output, not zeros equal to zeros
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    # the inserted temporal blocks are real: once they train, videos change, images (one frame,
    # attention over T'=1 is an identity of the value path) still pass through the block branches
    with torch.no_grad():
        for i in (1, 3):
            for lin in (stage2.blocks[i].attn.proj, stage2.blocks[i].mlp.fc2):
                lin.weight.normal_(0, 0.05)
        assert not torch.allclose(stage2(x, t, cond), a, atol=1e-4)


def test_stage2_trains_its_temporal_blocks(stage1):
    stage2 = build_model("tiny", controlnet_cross_view=False)
    init_from_state(stage2, stage1.state_dict(), stage1.config)
    x, t, cond = _inputs(9)
    stage2(x, t, cond).square().mean().backward()
    # the zeroed output projections get a gradient, so the temporal blocks can leave the identity
    for i in (1, 3):
        assert stage2.blocks[i].attn.proj.weight.grad.abs().sum() > 0
        assert stage2.blocks[i].mlp.fc2.weight.grad.abs().sum() > 0


def test_dropping_modules_is_refused_unless_asked(stage1):
    stage2 = perturb_zero_init(build_model("tiny", controlnet_cross_view=False))
    back = build_model("tiny", temporal=False, controlnet_cross_view=False)
    with pytest.raises(ValueError, match="init-allow-drop"):
        init_from_state(back, stage2.state_dict(), stage2.config)
    report = init_from_state(back, stage2.state_dict(), stage2.config, allow_drop=True)
    assert any(k.startswith("blocks.1.") for k in report.dropped) and not report.added
    # spatial blocks went to the spatial places: stage2.blocks[2] -> back.blocks[1]
    assert torch.equal(back.blocks[1].attn.q.weight, stage2.blocks[2].attn.q.weight)
    # the ControlNet's cross-view attention dropped too
    full = build_model("tiny")
    with pytest.raises(ValueError, match="no place"):
        init_from_state(stage2, full.state_dict(), full.config)


def test_shape_mismatch_is_refused(stage1):
    other = build_model("tiny", hidden=96, heads=4, temporal=False, controlnet_cross_view=False)
    with pytest.raises(ValueError, match="shapes differ"):
        init_from_state(other, stage1.state_dict(), stage1.config)


def test_fresh_blocks_are_identities():
    torch.manual_seed(0)
    m = build_model("tiny").eval()
    x, t, cond = _inputs(9)
    seen = []

    def check(block, args, out):
        seen.append(block)
        assert torch.equal(out, args[0]), "a fresh block changed its input"

    hooks = [b.register_forward_hook(check) for b in (*m.blocks, *m.controlnet.blocks)]
    with torch.no_grad():
        m(x, t, cond)
    for h in hooks:
        h.remove()
    assert len(seen) == len(m.blocks) + len(m.controlnet.blocks)


def test_cross_view_gate_starts_at_zero_and_learns():
    torch.manual_seed(0)
    m = build_model("tiny")
    cv = m.blocks[0].cross_view
    assert torch.equal(cv.gate, torch.zeros_like(cv.gate))
    x = torch.randn(1, 3, 2, 6, 64)                                            # (B, V, T', S, D)
    out = cv(x)
    assert torch.equal(out, torch.zeros_like(out))                             # identity branch at init
    (cv(x) * torch.randn_like(x)).sum().backward()
    assert cv.gate.grad.abs().sum() > 0                                        # but it can open
    with torch.no_grad():
        cv.gate.fill_(1.0)
    assert cv(x).abs().sum() > 0


def test_checkpoint_without_gate_keeps_its_cross_view():
    # a checkpoint written before the gate existed computed cross-view attention ungated (gate 1)
    torch.manual_seed(0)
    old = perturb_zero_init(build_model("tiny"))
    with torch.no_grad():
        for name, p in old.named_parameters():
            if name.endswith("cross_view.gate"):
                p.fill_(1.0)
    state = {k: v for k, v in old.state_dict().items() if not k.endswith("cross_view.gate")}
    new = build_model("tiny")
    report = init_from_state(new, state, old.config)
    assert report.upgraded and not report.added
    x, t, cond = _inputs(1)
    with torch.no_grad():
        torch.testing.assert_close(new(x, t, cond), old(x, t, cond), rtol=0, atol=0)
