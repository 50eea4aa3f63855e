"""Condition paths of MVDiT: their box corners and masks from our boxes, ego poses as LiDAR(0) -> LiDAR(t),
padding that never reaches the output, per-view boxes (an option on the same weights), the drops, the
CFG null branch, and the options that keep this project's former design (per-frame cameras, causal
encoders, the BEV-attention map branch)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model import native
from model.conditions import random_conditions
from model.embedders import box_corners_authors
from model.registry import build_model
from pipeline.contract import geometry
from tests.factories_train import perturb_zero_init

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return perturb_zero_init(build_model("tiny")).eval()


def _inputs(B=2, V=3, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = random_conditions(B, V, T, boxes=5, text_dim=32, bev_size=32, generator=g)
    x = torch.randn(B, V, 16, (T - 1) // 4 + 1, 4, 6, generator=g)
    return x, torch.rand(B, generator=g), cond


def test_box_corners_are_their_order_and_lift():
    """Their corners: mmdet3d order (x0y0z0, x0y0z1, x0y1z1, x0y1z0, x1y0z0, ...) of a box whose x
    extent is w pointing left of the heading, y extent l pointing back; lifted by h/2 (their centre
    read as the bottom centre). Unlifted, the set of corners is the real box's."""
    box = torch.tensor([[10.0, 5.0, 1.0, 2.0, 4.0, 1.5, 0.0]])     # heading +x: left = +y, back = -x
    c = box_corners_authors(box)[0]
    torch.testing.assert_close(c[0], torch.tensor([10.0 + 2.0, 5.0 - 1.0, 1.0]))   # a=0: right, b=0: front, bottom
    torch.testing.assert_close(c[6], torch.tensor([10.0 - 2.0, 5.0 + 1.0, 2.5]))   # a=1, b=1, top = z + h
    rng = np.random.default_rng(0)
    boxes = np.concatenate([rng.uniform(-40, 40, (5, 3)), rng.uniform(0.5, 5, (5, 3)), rng.uniform(-3, 3, (5, 1))], 1)
    real = box_corners_authors(torch.tensor(boxes), lifted=False).numpy()
    ours = geometry.box_corners(boxes)
    for i in range(5):   # same 8 points, another order
        d = np.abs(real[i][:, None] - ours[i][None]).sum(-1)
        assert d.min(1).max() < 1e-9


def test_native_inputs_camera_pose_masks():
    _, _, cond = _inputs()
    m = build_model("tiny")
    K = torch.tensor([[1266.0, 0, 816.0], [0, 1266.0, 491.0], [0, 0, 1]]).expand(2, 3, 3, 3)
    kw = native.native_inputs(m, cond.replace(source_intrinsics=K), (2, 3, 16, 3, 4, 6), None, None)
    assert kw["cams"].shape == (6, 9, 1, 3, 7)
    torch.testing.assert_close(kw["cams"][4, 2, 0, :, :3], K[1, 1])                        # row b V + v: b 1, v 1
    torch.testing.assert_close(kw["cams"][4, 2, 0, :, 3:], cond.cam2lidar[1, 2, 1, :3, :4])
    rel = kw["rel_pos"][:, :, 0]                                                           # LiDAR(0) -> LiDAR(t)
    torch.testing.assert_close(rel[3] @ cond.traj[1], torch.eye(4).expand(9, 4, 4), atol=1e-5, rtol=0)
    assert kw["fps"].tolist() == [12.0, 12.0] and kw["height"].tolist() == [32.0, 32.0]
    used = cond.box_mask.any(1)                                                            # (B, N) in the clip
    masks = kw["bbox"]["masks"].view(2, 3, 9, -1)                                          # their collate: used
    assert masks.shape[-1] == int(used.sum(1).max())                                       # boxes first, padded
    assert masks.dtype == torch.int32 and set(masks.unique().tolist()) <= {0, 1}
    for b in range(2):
        slots = torch.nonzero(used[b])[:, 0]
        assert not masks[b, :, :, len(slots):].any()                                        # padding = 0
        absent = ~cond.box_mask[b][:, slots]                                               # (T, k)
        assert not masks[b, :, :, :len(slots)][absent[None].expand(3, -1, -1)].any()        # absent = 0
    # a box is a key of view v when any real corner lies in front of that camera (their z > 0 rule)
    c2l = cond.cam2lidar[0, 0, 0]
    box = cond.boxes[0, 0][cond.box_mask[0, 0]][0]
    z = ((box_corners_authors(box[None], lifted=False)[0] - c2l[:3, 3]) @ c2l[:3, 2])
    n = int(torch.nonzero(cond.box_mask[0, 0])[0])
    slot = int((torch.nonzero(used[0])[:, 0] == n).nonzero()[0])
    assert bool(masks[0, 0, 0, slot]) == bool((z > 0).any())
    assert native.native_inputs(m, cond, (2, 3, 16, 1, 4, 6), None, None)["fps"].tolist() == [12.0, 12.0]
    one = random_conditions(1, 2, 1, text_dim=32, bev_size=8)
    assert native.native_inputs(m, one, (1, 2, 16, 1, 2, 2), None, None)["fps"].tolist() == [120.0]


def test_padding_never_reaches_the_output(model):
    x, t, cond = _inputs()
    mask = cond.box_mask.clone()
    mask[0, :, 1] = False
    cond = model.draw_box_latent(cond.replace(box_mask=mask), torch.Generator().manual_seed(1))
    junk_ref = cond.boxes.clone()
    junk_ref[0, :, 1] = float("nan")
    junk_view = cond.view_boxes.clone()
    junk_view[0, :, :, 1] = 1e6
    with torch.no_grad():
        a = model(x, t, cond)
        b = model(x, t, cond.replace(boxes=junk_ref, view_boxes=junk_view))
    assert torch.equal(a, b)


def test_per_view_boxes_are_an_option_on_the_same_weights(model):
    """Default: the reference boxes repeated for every view (theirs); boxes_per_view: each view's own
    boxes. Same state dict; moving view 2's boxes changes the output only with the option."""
    x, t, cond = _inputs()
    cond = model.draw_box_latent(cond, torch.Generator().manual_seed(2))
    per_view = build_model("tiny", boxes_per_view=True).eval()
    per_view.load_state_dict(model.state_dict())
    moved = cond.view_boxes.clone()
    moved[:, :, 2, :, :2] += 3.0
    with torch.no_grad():
        assert torch.equal(model(x, t, cond), model(x, t, cond.replace(view_boxes=moved)))
        assert not torch.allclose(per_view(x, t, cond), per_view(x, t, cond.replace(view_boxes=moved)))


def test_drops_and_the_null_branch(model):
    """drop_cond: text -> null caption, camera / ego pose -> uncond_cam, real boxes -> mask features;
    drop_frames masks single frames; the CFG null branch (null boxes) differs from a training drop."""
    x, t, cond = _inputs(B=1)
    cond = model.draw_box_latent(cond, torch.Generator().manual_seed(3))
    with torch.no_grad():
        keep = model(x, t, cond)
        dropped = model(x, t, cond, torch.tensor([True]))
        frames = torch.zeros(1, 9, dtype=torch.bool)
        frames[0, 4] = True
        masked = model(x, t, cond, None, frames)
        other_text = model(x, t, cond.replace(text=torch.randn_like(cond.text)), torch.tensor([True]))
        g1 = model.guided_velocity(x, t, cond, 1.0)
        g0 = model.guided_velocity(x, t, cond, 0.0)
        g2 = model.guided_velocity(x, t, cond, 2.0)
    assert not torch.allclose(keep, dropped) and not torch.allclose(keep, masked)
    torch.testing.assert_close(dropped, other_text)              # a dropped caption is not read
    torch.testing.assert_close(g1, keep, rtol=1e-4, atol=1e-5)   # scale 1: the conditional branch
    assert not torch.allclose(g0, dropped, atol=1e-4)            # their null branch: null boxes, not masked ones
    torch.testing.assert_close(g2, 2 * g1 - g0, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("option", [{"camera_per_frame": True}, {"causal_cond": True},
                                    {"map_branch": "bev_attention"}, {"boxes_per_view": True},
                                    {"box_corners": "true"}])
def test_former_design_options_train(option):
    """This project's former choices as options: they build, run and get gradients."""
    torch.manual_seed(0)
    m = perturb_zero_init(build_model("tiny", **option))
    x, t, cond = _inputs(T=9)
    out = m(x, t, cond)
    out.square().mean().backward()
    assert out.shape == x.shape and torch.isfinite(out).all()
    if "camera_per_frame" in option:   # a camera moving within the clip now changes the tokens
        c2 = cond.cam2lidar.clone()
        c2[:, 5:, :, 0, 3] += 2.0
        with torch.no_grad():
            assert not torch.allclose(m(x, t, cond), m(x, t, cond.replace(cam2lidar=c2)))
    if "causal_cond" in option:        # the last frames' boxes do not reach earlier latents' box tokens
        b = cond.boxes.clone()
        b[:, 5:, :, :2] += 5.0
        keep = torch.ones(6, 9, dtype=torch.bool)
        cond = m.draw_box_latent(cond)
        with torch.no_grad():
            tok = [m.encode_box(native.native_inputs(m, c, x.shape, None, None)["bbox"], keep)
                   for c in (cond, cond.replace(boxes=b))]
        d = (tok[0] - tok[1]).abs().amax((0, 2, 3))                        # per latent frame
        assert d[0] == 0 and d[1] == 0 and d[2] > 0
    if "map_branch" in option:
        assert m.map_attention.out.weight.grad.abs().sum() > 0
