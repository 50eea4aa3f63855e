"""The classifier-free-guidance drops of training (INTERFACES C): all conditions together for
flow.drop_all of the samples, boxes and trajectory of flow.drop_frames_ratio of the interior
frames in the others; and that the model consumes them as the nulls they stand for."""
from __future__ import annotations

import copy

import math

import torch

from model.conditions import random_conditions
from model.registry import build_model
from tests.factories_train import perturb_zero_init
from train.config import FlowConfig
from train.train import condition_drops, step_generator


def _trainer_draws(steps: int, batch: int, frames: int, cfg: FlowConfig = FlowConfig()):
    """What the trainer draws: one batch per step from that step's generator."""
    got = [condition_drops(batch, frames, cfg, step_generator(0, s, 0)) for s in range(steps)]
    return torch.cat([g[0] for g in got]), torch.cat([g[1] for g in got])


def test_all_conditions_drop_together_at_15_percent():
    """400 samples (100 steps of batch 4): the all-drop share within 4 sigma of 0.15 (+-0.071)."""
    cond, frames = _trainer_draws(100, 4, 17)
    rate = float(cond.float().mean())
    assert abs(rate - 0.15) < 4 * math.sqrt(0.15 * 0.85 / 400), rate
    assert frames[cond].all()                 # an all-dropped sample has every frame masked too (the authors')
    # a larger draw pins it: 20000 samples, 4 sigma = 1 %
    big, _ = condition_drops(20_000, 1, FlowConfig(), step_generator(0, 7, 0))
    assert abs(float(big.float().mean()) - 0.15) < 0.01
    assert not condition_drops(64, 17, FlowConfig(drop_all=0.0), step_generator(0, 1, 0))[0].any()


def test_frame_masking_counts_and_spares_the_ends():
    for T, k in ((1, 0), (9, 2), (17, 6), (33, 12)):        # int(0.4 * (T - 2)), the authors' count
        cond, frames = _trainer_draws(50, 4, T)
        kept = frames[~cond]                                 # (n, T)
        assert kept.shape[1] == T and (kept.sum(1) == k).all(), (T, kept.sum(1).unique())
        if T > 1:
            assert not kept[:, 0].any() and not kept[:, -1].any()   # never the first or the last frame
    # every interior frame is chosen alike: each at 6/15 = 0.4 over ~680 samples (4 sigma ~ 0.075)
    cond, frames = _trainer_draws(200, 4, 17)
    per_frame = frames[~cond][:, 1:-1].float().mean(0)
    assert (per_frame - 0.4).abs().max() < 0.075, per_frame
    # the ratio is the config's
    cond, frames = _trainer_draws(20, 4, 17, FlowConfig(drop_frames_ratio=0.2))
    assert (frames[~cond].sum(1) == 3).all()


def test_drops_are_a_pure_function_of_the_step_generator():
    a = condition_drops(8, 17, FlowConfig(), step_generator(3, 11, 2))
    b = condition_drops(8, 17, FlowConfig(), step_generator(3, 11, 2))
    c = condition_drops(8, 17, FlowConfig(), step_generator(3, 12, 2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))


def _setup():
    torch.manual_seed(0)
    model = perturb_zero_init(build_model("tiny"), std=0.5).eval()   # every branch (ControlNet too) counts
    g = torch.Generator().manual_seed(3)
    cond = random_conditions(2, 3, 9, boxes=3, text_len=6, text_dim=32, bev_size=40, generator=g)
    cond = model.draw_box_latent(cond, torch.Generator().manual_seed(4))   # fixed per-box latents: a pure function
    x = torch.randn(2, 3, 16, 3, 4, 8, generator=g)
    return model, cond, x, torch.rand(2, generator=g)


@torch.no_grad()
def test_drop_cond_is_every_condition_but_the_map_at_once():
    """A dropped sample ignores the values of its text, camera, boxes and trajectory (what is present stays
    what it is: the authors' null/mask box slots), but not its map; the other sample is untouched."""
    model, cond, x, t = _setup()
    d = torch.tensor([False, True])
    joint = model(x, t, cond, drop_cond=d)
    assert torch.allclose(joint[0], model(x, t, cond)[0], atol=1e-6)          # sample 0 untouched
    assert not torch.allclose(joint[1], model(x, t, cond)[1], atol=1e-4)      # the drop does something
    other = random_conditions(2, 3, 9, boxes=3, text_len=6, text_dim=32, bev_size=40,
                              generator=torch.Generator().manual_seed(9))
    for name in ("bev", "box_mask", "box_view_mask", "box_class", "box_latent", "text_mask"):
        setattr(other, name, getattr(cond, name))
    assert torch.allclose(model(x, t, other, drop_cond=d)[1], joint[1], atol=1e-5)
    moved_map = copy.copy(cond)
    moved_map.bev = 1.0 - cond.bev
    assert not torch.allclose(model(x, t, moved_map, drop_cond=d)[1], joint[1], atol=1e-4)   # the map is kept


@torch.no_grad()
def test_masked_frames_hide_their_boxes_and_trajectory():
    """Changing the boxes and poses of the masked frames changes nothing; unmasked, it does."""
    model, cond, x, t = _setup()
    frames = torch.zeros(2, 9, dtype=torch.bool)
    frames[:, [2, 5]] = True
    base = model(x, t, cond, drop_frames=frames)
    moved = copy.copy(cond)
    moved.boxes, moved.view_boxes, moved.traj = cond.boxes.clone(), cond.view_boxes.clone(), cond.traj.clone()
    moved.boxes[:, [2, 5], :, :3] += 5.0
    moved.view_boxes[:, [2, 5], :, :, :3] += 5.0
    moved.traj[:, [2, 5], :3, 3] += 5.0
    assert torch.allclose(model(x, t, moved, drop_frames=frames), base, atol=1e-5)
    assert not torch.allclose(model(x, t, moved), model(x, t, cond), atol=1e-4)
