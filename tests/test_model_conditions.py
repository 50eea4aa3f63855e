"""Condition paths of MVDiT: box masking, per-view boxes, per-frame cameras, the whole-clip causal
box/trajectory encoder and CogVAE-aligned downsampling, ControlNet zero-init, CFG drop API,
gradient flow to every parameter, box corner geometry."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model.conditions import CONDITION_NAMES, Conditions, random_conditions
from model.embedders import box_corners
from model.registry import build_model
from pipeline.contract import geometry

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
    """A slot is padding in view v and frame t when the object has neither a reference box (box_mask) nor
    a box seen by v (box_view_mask): what padding holds (even NaN) never reaches the output."""
    x, t, cond = _inputs()
    mask = cond.box_mask.clone()
    mask[0, :, 1] = False          # a box absent in every frame
    mask[1, 5:, 2] = False         # a box that leaves after frame 4
    vis = cond.box_view_mask.clone()
    vis[0, :, :, 1] = False
    vis[1, 5:, :, 2] = False
    cond = _replace(cond, box_mask=mask, box_view_mask=vis)
    pad = ~(mask[:, :, None] | vis)                                       # (B, T, V, N)
    assert pad.any() and (~pad).any()
    boxes = torch.where(pad[..., None], torch.full_like(cond.view_boxes, 1e4), cond.view_boxes)
    boxes[0, :, :, 1] = float("nan")  # padding may hold anything
    other = _replace(cond, view_boxes=boxes)
    with torch.no_grad():
        a, b = model(x, t, cond), model(x, t, other)
    assert torch.equal(a, b)
    # the same edit on a present box does change the output (the test can fail)
    boxes2 = cond.view_boxes.clone()
    boxes2[0, :, :, mask[0, 0].nonzero()[0, 0]] += 3.0
    with torch.no_grad():
        assert not torch.allclose(a, model(x, t, _replace(cond, view_boxes=boxes2)))


def test_box_seen_by_a_view_without_a_reference_box_is_a_key_of_that_view():
    """An object that enters the scene between CAM_FRONT's exposure and view 2's (up to ~43 ms later) has
    no reference box in that frame (box_mask False) but view 2 sees it (box_view_mask): its view-2 boxes
    must condition view 2. The model once gated keys with box_mask & box_view_mask and dropped it."""
    torch.manual_seed(0)
    m = _perturb(build_model("tiny", cross_view="none")).eval()
    x, t, cond = _inputs(B=1, V=4, T=9)
    mask = cond.box_mask.clone()
    mask[0, :, 0] = False                                   # object 0: never present at CAM_FRONT's time
    vis = cond.box_view_mask.clone()
    vis[0, :, :, 0] = False
    vis[0, :, 2, 0] = True                                  # ... but seen by view 2 in every frame
    cond = _replace(cond, box_mask=mask, box_view_mask=vis)
    moved = cond.view_boxes.clone()
    moved[0, :, 2, 0, :2] += 2.0
    with torch.no_grad():
        d = (m(x, t, cond) - m(x, t, _replace(cond, view_boxes=moved))).abs().flatten(2).amax(-1)[0]  # (V,)
    assert d[2] > 1e-5, d
    assert torch.all(d[torch.arange(4) != 2] == 0), d


def test_per_view_boxes_shapes_and_view_isolation(model):
    """View v's box tokens come from view v's boxes only: moving the objects in view 2 changes
    the encoder output of view 2 and nothing else."""
    _, _, cond = _inputs(B=2, V=4, T=9)
    moved = cond.view_boxes.clone()
    moved[:, :, 2, :, :3] += torch.tensor([0.7, -1.1, 0.2])
    with torch.no_grad():
        a, ma = model.boxes(cond.view_boxes, cond.box_class, cond.box_mask)
        b, _ = model.boxes(moved, cond.box_class, cond.box_mask)
    assert a.shape == (2, 3, 4, 5, model.config.hidden) and ma.shape == (2, 3, 4, 5)
    d = (a - b).abs().amax(dim=(0, 1, 3, 4))                          # (V,)
    assert d[2] > 1e-4
    assert torch.all(d[torch.arange(4) != 2] == 0), d


def test_view_boxes_reach_only_their_view_end_to_end():
    """Without cross-view attention (base and ControlNet), editing view 2's boxes changes view 2's
    velocity and leaves every other view's bit-identical, at weights where every path is live."""
    torch.manual_seed(0)
    m = _perturb(build_model("tiny", cross_view="none")).eval()
    x, t, cond = _inputs(B=1, V=4, T=9)
    present = cond.box_mask[0, 0].nonzero()[:, 0]
    vis = cond.box_view_mask.clone()
    vis[:, :, :, present] = True                                       # the edited boxes are keys of every view
    cond = _replace(cond, box_view_mask=vis)
    moved = cond.view_boxes.clone()
    moved[:, :, 2, present, :2] += 2.0
    with torch.no_grad():
        d = (m(x, t, cond) - m(x, t, _replace(cond, view_boxes=moved))).abs().flatten(2).amax(-1)[0]  # (V,)
    assert d[2] > 1e-5
    assert torch.all(d[torch.arange(4) != 2] == 0), d


def test_camera_tokens_per_latent_frame(model):
    """cam2lidar (B, T, V, 4, 4): a static rig gives the same token in every latent frame; moving
    one camera in frames 5..8 changes that view's token of latent frame 2 only."""
    _, _, cond = _inputs(B=1, V=3, T=13)
    H, W = 32, 48
    with torch.no_grad():
        cam = model.camera(cond.intrinsics, cond.cam2lidar, H, W)                  # (B, V, T', D)
        assert cam.shape == (1, 3, 4, model.config.hidden)
        assert torch.allclose(cam, cam[:, :, :1].expand_as(cam), atol=1e-6)        # random_conditions: static rig
        c2l = cond.cam2lidar.clone()
        c2l[:, 5:9, 1, :3, 3] += torch.tensor([0.0, 0.8, 0.0])                     # view 1 moves on in group 2
        moved = model.camera(cond.intrinsics, c2l, H, W)
    assert (moved[0, 1, 2] - moved[0, 1, 1]).abs().max() > 1e-4                      # differs per latent frame
    d = (cam - moved).abs().amax(-1)[0]                                              # (V, T')
    assert d[1, 2] > 1e-4
    d[1, 2] = 0
    assert torch.all(d == 0), d


def test_rays_follow_per_frame_extrinsics():
    from model.embedders import rays_lidar
    K = torch.tensor([[8.0, 0, 8.0], [0, 8.0, 8.0], [0, 0, 1]]).expand(1, 2, 3, 3)
    c2l = torch.eye(4).expand(1, 5, 2, 4, 4).clone()
    # view 0 pitches by up to 0.2 rad (about x) during frames 1..4; latent 1 sees the mean rotation
    for i in range(1, 5):
        a = 0.05 * i
        c2l[0, i, 0, 1:3, 1:3] = torch.tensor([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    r = rays_lidar(K, c2l, 1, 1, 16)                                                # (1, 2, 2, 1, 3)
    assert r.shape == (1, 2, 2, 1, 3)
    centre = torch.tensor([0.0, 0.0, 1.0])                                           # K^-1 (8, 8) / 16 px cell centre
    assert torch.allclose(r[0, :, 0, 0], centre.expand(2, 3), atol=1e-6)             # frame 0: identity for both
    assert torch.allclose(r[0, 1, 1, 0], centre, atol=1e-6)                          # view 1 static
    mean_rot = c2l[0, 1:5, 0, :3, :3].mean(0)
    want = torch.nn.functional.normalize(mean_rot @ centre, dim=0)
    assert torch.allclose(r[0, 0, 1, 0], want, atol=1e-6) and not torch.allclose(want, centre, atol=1e-3)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_box_encoder_is_causal_over_the_whole_clip(model, k):
    """Changing the frames of CogVAE group k changes latent k and every later latent (the encoder
    attends over the whole clip, paper Fig. 4b) and never an earlier one (attention is causal, as
    CogVAE is: latent k depends on pixel frames <= 4k). Before the whole-clip encoder this test
    asserted that *only* latent k changed (attention inside each group)."""
    _, _, cond = _inputs(B=1, T=17)
    frames = [0] if k == 0 else list(range(4 * k - 3, 4 * k + 1))
    boxes = cond.view_boxes.clone()
    boxes[:, frames] += torch.tensor([1.0, -2.0, 0.3, 0.5, 0.2, 0.1, 0.4])
    mask = torch.ones_like(cond.box_mask)
    with torch.no_grad():
        a, ma = model.boxes(cond.view_boxes, cond.box_class, mask)
        b, _ = model.boxes(boxes, cond.box_class, mask)
    assert a.shape == (1, 5, 3, 5, model.config.hidden) and ma.all()
    changed = (a - b).abs().flatten(2).amax(-1)[0]           # (T',)
    assert changed[k] > 1e-4
    assert torch.all(changed[k + 1:] > 1e-6), changed
    assert torch.all(changed[:k] == 0), changed


def test_box_encoder_relates_frames_across_groups(model):
    """An object's token in latent 3 depends on where it was in frame 0 (four groups back)."""
    _, _, cond = _inputs(B=1, T=13)
    boxes = cond.view_boxes.clone()
    boxes[:, 0, :, :, :2] += 1.5
    mask = torch.ones_like(cond.box_mask)
    with torch.no_grad():
        a, _ = model.boxes(cond.view_boxes, cond.box_class, mask)
        b, _ = model.boxes(boxes, cond.box_class, mask)
    assert (a[:, 3] - b[:, 3]).abs().max() > 1e-6


@pytest.mark.parametrize("k", [0, 2])
def test_traj_and_bev_downsampling_are_aligned(model, k):
    """Trajectory: the same causal whole-clip encoder as the boxes (latent k and later change);
    BEV: the ControlNet's CogVAE-shaped downsampling stays inside each group (only latent k)."""
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
        assert torch.all(d[:k] == 0), d
    assert torch.all(dt[k + 1:] > 1e-6), dt
    assert torch.all(db[k + 1:] == 0), db


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
    field = {"text": "text", "camera": "intrinsics", "boxes": "view_boxes", "traj": "traj", "map": "bev"}[name]
    g = torch.Generator().manual_seed(5)
    changed = _replace(cond, **{field: getattr(cond, field) + torch.rand(getattr(cond, field).shape, generator=g)})
    if name == "camera":
        changed = _replace(changed, cam2lidar=cond.cam2lidar.flip(2))
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
