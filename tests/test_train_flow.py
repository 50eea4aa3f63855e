"""train/flow.py numerics and the box projection of the contact sheet (condition drops: test_train_drops.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from train import flow
from train.config import FlowConfig
from train.train import step_flops
from train.video import draw_boxes, grid


def test_interpolation_and_target():
    x0, eps = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    t = torch.tensor([0.0, 0.25, 1.0])
    xt = flow.interpolate(x0, eps, t)
    assert torch.allclose(xt[0], x0[0]) and torch.allclose(xt[2], eps[2])
    assert torch.allclose(xt[1], 0.75 * x0[1] + 0.25 * eps[1])
    # v is the time derivative of x_t along the straight path
    h = 1e-3
    tt = torch.full((3,), 0.4)
    fd = (flow.interpolate(x0, eps, tt + h) - flow.interpolate(x0, eps, tt - h)) / (2 * h)
    assert torch.allclose(fd, flow.velocity_target(x0, eps), atol=1e-3)
    assert flow.flow_loss(flow.velocity_target(x0, eps), x0, eps) == 0


def test_shift():
    cfg = FlowConfig()   # the authors' base: 512 x 512 pixels, one latent frame (timestep_transform)
    assert flow.shift_factor(cfg, 512, 512, 1) == pytest.approx(1.0)
    assert flow.shift_factor(cfg, 224, 400, 1) == pytest.approx(math.sqrt(224 * 400 / 512 ** 2))   # 0.585
    assert flow.shift_factor(cfg, 1024, 1024, 1) == pytest.approx(2.0)
    # sqrt(T'): 17 frames -> T' = 5 (the authors' cog_style: 17 // 4 + 17 % 2)
    assert flow.shift_factor(cfg, 424, 800, 5) == pytest.approx(math.sqrt(424 * 800 / 512 ** 2) * math.sqrt(5))
    old = FlowConfig(shift_base_pixels=224 * 400)     # the base before: 1.71x stronger everywhere
    assert flow.shift_factor(old, 424, 800, 5) / flow.shift_factor(cfg, 424, 800, 5) == pytest.approx(1.7104, abs=1e-4)
    t = torch.linspace(0, 1, 11)
    s = flow.shift_time(t, 3.0)
    assert s[0] == 0 and s[-1] == 1 and torch.all(s[1:-1] > t[1:-1]) and torch.all(s.diff() > 0)
    assert torch.allclose(flow.shift_time(t, 1.0), t)
    assert float(flow.shift_time(torch.tensor(0.5), 3.0)) == pytest.approx(0.75)


def test_logit_normal_timesteps():
    cfg = FlowConfig(logit_mean=0.0, logit_std=1.0)
    t = flow.sample_timesteps(200_000, cfg, 1.0, torch.Generator().manual_seed(0))
    assert 0 < float(t.min()) and float(t.max()) < 1
    logit = torch.log(t / (1 - t))
    assert abs(float(logit.mean())) < 0.01 and abs(float(logit.std()) - 1) < 0.01
    shifted = flow.sample_timesteps(200_000, cfg, 3.0, torch.Generator().manual_seed(0))
    assert float(shifted.median()) == pytest.approx(0.75, abs=0.01)  # median 0.5 shifted by s=3


def test_euler_recovers_data_on_a_straight_path():
    """With the exact velocity eps - x0 the flow is straight and Euler is exact at any step count."""
    x0, eps = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    calls = []

    def velocity(x, t, drop):
        calls.append((x.shape[0], drop))
        return eps - x0

    for steps, shift in ((30, 1.0), (7, 2.5)):
        out = flow.euler_sample(velocity, eps.clone(), steps=steps, shift=shift)
        assert torch.allclose(out, x0, atol=1e-5)
    assert len(calls) == 37


def test_cfg_combines_branches():
    x = torch.zeros(2, 4)

    def velocity(x, t, drop):
        assert x.shape[0] == 4 and drop["text"].tolist() == [False, False, True, True]
        return torch.cat([torch.full((2, 4), 1.0), torch.full((2, 4), 3.0)])  # cond 1, uncond 3

    out = flow.euler_sample(velocity, x, steps=1, cfg_scale=2.0, null_drop={"text": True})
    # v = 3 + 2 * (1 - 3) = -1 ; one step from t=1 to 0: x = 0 + (0 - 1) * (-1) = 1
    assert torch.allclose(out, torch.ones(2, 4))


def test_box_projection_lands_where_the_camera_sees_it():
    # camera looking along LiDAR +y (forward): cam x = lidar x, cam y = -lidar z, cam z = lidar y
    cam2lidar = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]], np.float64)
    k = np.array([[50.0, 0, 64], [0, 50.0, 32], [0, 0, 1]])
    img = np.zeros((64, 128, 3), np.uint8)
    box = np.array([[0.0, 10.0, 0.0, 2.0, 2.0, 2.0, 0.0]])  # 10 m ahead, 2 m cube
    out = draw_boxes(img, box, np.array([0]), k, cam2lidar)
    ys, xs = np.nonzero(out.any(-1))
    # the near face (y = 9) spans x, z in [-1, 1] -> u = 64 +- 50/9, v = 32 -+ 50/9
    assert xs.min() == pytest.approx(64 - 50 / 9, abs=1.0) and xs.max() == pytest.approx(64 + 50 / 9, abs=1.0)
    assert ys.min() == pytest.approx(32 - 50 / 9, abs=1.0) and ys.max() == pytest.approx(32 + 50 / 9, abs=1.0)
    behind = draw_boxes(img, box * np.array([1, -1, 1, 1, 1, 1, 1]), np.array([0]), k, cam2lidar)
    assert not behind.any()  # behind the camera: nothing drawn


def test_grid_layout_and_flops():
    views = np.arange(6)[:, None, None, None] * np.ones((6, 2, 3, 3), np.uint8)  # (V, H, W, 3)
    g = grid(views, cols=3)
    assert g.shape == (4, 9, 3) and g[0, 0, 0] == 0 and g[0, 3, 0] == 1 and g[2, 0, 0] == 3 and g[3, 8, 0] == 5
    from model.registry import PRESETS
    cfg = PRESETS["tiny"]
    f1 = step_flops(cfg, 1000, (1, 6, 16, 1, 8, 16))
    f2 = step_flops(cfg, 1000, (2, 6, 16, 1, 8, 16))
    assert f2 == pytest.approx(2 * f1)
    assert f1 >= 6 * 1000 * 6 * 1 * 4 * 8  # at least 6 N per token (32 tokens per view)
