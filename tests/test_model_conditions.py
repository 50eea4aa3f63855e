"""Condition paths of MVDiT: box masking, CogVAE-aligned temporal downsampling (causality),
ControlNet zero-init, CFG drop API, gradient flow to every parameter, box corner geometry."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model.conditions import CONDITION_NAMES, Conditions, random_conditions
from model.embedders import box_corners
from model.registry import build_model
from pipeline import geometry

torch.set_num_threads(1)


def _perturb(model, std=0.05, seed=0, skip=()):
    """Give zero-initialised tensors values (except names starting with `skip`)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.any() and not name.startswith(tuple(skip)):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _replace(cond: Conditions, **kw) -> Conditions:
    d = {k: getattr(cond, k) for k in cond.__dataclass_fields__}
    d.update(kw)
    return Conditions(**d)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return _perturb(build_model("tiny")).eval()


def _inputs(B=2, V=3, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = random_conditions(B, V, T, boxes=5, text_dim=32, bev_size=32, generator=g)
    x = torch.randn(B, V, 16, (T - 1) // 4 + 1, 4, 6, generator=g)
    return x, torch.rand(B, generator=g), cond


def test_box_corners_match_pipeline_geometry():
    rng = np.random.default_rng(0)
    boxes = np.concatenate([rng.uniform(-40, 40, (5, 3)), rng.uniform(0.5, 5, (5, 3)),
                            rng.uniform(-np.pi, np.pi, (5, 1))], 1)
    ours = box_corners(torch.tensor(boxes, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(ours, geometry.box_corners(boxes), atol=1e-9)


def test_padded_boxes_do_not_change_output(model):
    x, t, cond = _inputs()
    mask = cond.box_mask.clone()
    mask[0, :, 1] = False          # a box absent in every frame
    mask[1, 5:, 2] = False         # a box that leaves after frame 4
    cond = _replace(cond, box_mask=mask)
    assert (~mask).any() and mask.any()
    boxes = torch.where(mask[..., None], cond.boxes, torch.full_like(cond.boxes, 1e4))
    boxes[0, :, 1] = float("nan")  # padding may hold anything
    vis = cond.box_view_mask | ~mask[:, :, None]  # visibility of padded slots is irrelevant too
    other = _replace(cond, boxes=boxes, box_view_mask=vis)
    with torch.no_grad():
        a, b = model(x, t, cond), model(x, t, other)
    assert torch.equal(a, b)
    # the same edit on a present box does change the output (the test can fail)
    boxes2 = cond.boxes.clone()
    boxes2[0, :, mask[0, 0].nonzero()[0, 0]] += 3.0
    with torch.no_grad():
        assert not torch.allclose(a, model(x, t, _replace(cond, boxes=boxes2)))


@pytest.mark.parametrize("k", [0, 1, 3])
def test_box_encoder_is_aligned_with_cogvae_groups(model, k):
    _, _, cond = _inputs(B=1, T=17)
    frames = [0] if k == 0 else list(range(4 * k - 3, 4 * k + 1))
    boxes = cond.boxes.clone()
    boxes[:, frames] += torch.tensor([1.0, -2.0, 0.3, 0.5, 0.2, 0.1, 0.4])
    mask = torch.ones_like(cond.box_mask)
    with torch.no_grad():
        a, ma = model.boxes(cond.boxes, cond.box_class, mask)
        b, _ = model.boxes(boxes, cond.box_class, mask)
    assert a.shape == (1, 5, 5, model.config.hidden) and ma.all()
    changed = (a - b).abs().flatten(2).amax(-1)[0]           # (T',)
    assert changed[k] > 1e-4
    assert torch.all(changed[torch.arange(5) != k] == 0), changed


@pytest.mark.parametrize("k", [0, 2])
def test_traj_and_bev_downsampling_are_aligned(model, k):
    _, _, cond = _inputs(B=1, T=17)
    frames = [0] if k == 0 else list(range(4 * k - 3, 4 * k + 1))
    traj = cond.traj.clone()
    traj[:, frames, :3, 3] += 5.0
    bev = cond.bev.clone()
    bev[:, frames] = 1.0 - bev[:, frames]
    with torch.no_grad():
        dt = (model.traj(cond.traj) - model.traj(traj)).abs().amax(-1)[0]                 # (T',)
        db = (model.controlnet.bev_tokens(cond.bev) - model.controlnet.bev_tokens(bev)).abs().flatten(2).amax(-1)[0]
    for d in (dt, db):
        assert d.shape == (5,) and d[k] > 1e-4
        assert torch.all(d[torch.arange(5) != k] == 0), d


def test_controlnet_zero_init_keeps_base_output():
    torch.manual_seed(0)
    # everything non-zero except the ControlNet's own zero-initialised projections
    m = _perturb(build_model("tiny"), skip=("controlnet.input_proj", "controlnet.out_projs")).eval()
    x, t, cond = _inputs()
    with torch.no_grad():
        with_map = m(x, t, cond)
        base = m(x, t, cond, controlnet_scale=0.0)
        assert base.abs().sum() > 0
        assert torch.equal(with_map, base)
        _perturb(m, seed=1)                                      # now the map branch is live
        assert not torch.allclose(m(x, t, cond), base)


def test_controlnet_blocks_start_as_copies_of_base_blocks():
    m = build_model("tiny")
    for cb, b in zip(m.controlnet.blocks, m.blocks):
        for (n1, p1), (n2, p2) in zip(cb.named_parameters(), b.named_parameters()):
            assert n1 == n2 and torch.equal(p1, p2)
            assert p1.data_ptr() != p2.data_ptr()                 # copies, not shared


@pytest.mark.parametrize("name", CONDITION_NAMES)
def test_drop_uses_null_condition_per_sample(model, name):
    x, t, cond = _inputs()
    # two identical samples; drop `name` for sample 0 only
    one = lambda v: torch.cat([v[:1], v[:1]])  # noqa: E731
    x, t = one(x), one(t)
    cond = Conditions(**{k: one(getattr(cond, k)) for k in cond.__dataclass_fields__})
    field = {"text": "text", "camera": "intrinsics", "boxes": "boxes", "traj": "traj", "map": "bev"}[name]
    g = torch.Generator().manual_seed(5)
    changed = _replace(cond, **{field: getattr(cond, field) + torch.rand(getattr(cond, field).shape, generator=g)})
    if name == "camera":
        changed = _replace(changed, cam2lidar=cond.cam2lidar.flip(1))
    drop = {name: torch.tensor([True, False])}
    with torch.no_grad():
        kept = model(x, t, cond)
        dropped = model(x, t, cond, drop=drop)
        dropped_changed = model(x, t, changed, drop=drop)
        kept_changed = model(x, t, changed)
    assert torch.allclose(dropped[1], kept[1], atol=1e-6)                 # the other sample is untouched
    assert not torch.allclose(dropped[0], kept[0], atol=1e-4)             # the null differs from the condition
    assert torch.allclose(dropped_changed[0], dropped[0], atol=1e-6)      # null ignores the condition's content
    assert not torch.allclose(kept_changed[1], kept[1], atol=1e-4)        # ... which matters when kept


def test_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    m = _perturb(build_model("tiny")).train()
    m.enable_gradient_checkpointing()
    x, t, cond = _inputs(B=2, T=9)
    # sample 1 drops everything (so the null embeddings take part), sample 0 keeps everything
    drop = {n: torch.tensor([False, True]) for n in CONDITION_NAMES}
    m(x, t, cond, drop=drop).square().mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
