"""Numeric tests of the synthetic world: rig geometry, road, closed-form motions, clipping."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.contract.geometry import make_transform, matrix_to_quat, transform_points, yaw_to_quat
from pipeline.synth.writer import keyframe_indices
from pipeline.synth.render import clip_near
from pipeline.synth.world import (CATEGORY_SPECS, EGO_OFFSET, LIDAR_YAW, TRIGGER_SWEEPS, ObjectTrack,
                                  camera_intrinsics, camera_rotation, camera_to_ego, lidar_rotation, make_ego,
                                  make_objects, make_road, trigger_rounds)


def test_camera_rig_matches_nuscenes_conventions():
    # real CAM_FRONT rotation is about (0.5, -0.5, 0.5, -0.5): optical axis = ego forward
    q = matrix_to_quat(camera_rotation("CAM_FRONT", tilted=False))
    assert np.allclose(q, [0.5, -0.5, 0.5, -0.5], atol=1e-9)
    for ch, expect in (("CAM_FRONT", [1, 0, 0]), ("CAM_BACK", [-1, 0, 0]),
                       ("CAM_FRONT_LEFT", [np.cos(np.radians(55)), np.sin(np.radians(55)), 0])):
        axis = camera_rotation(ch, tilted=False) @ np.array([0.0, 0.0, 1.0])   # camera z in the ego frame
        assert np.allclose(axis, expect, atol=1e-9), ch
        down = camera_rotation(ch, tilted=False) @ np.array([0.0, 1.0, 0.0])   # image y points down
        assert np.allclose(down, [0, 0, -1], atol=1e-9)
        # the real rig's mounts: the optical axis and the image's down direction leave the
        # horizontal / vertical by 0.4-1.2 degrees (nothing may assume yaw-only rotations)
        tilt_axis = np.degrees(np.arcsin(abs((camera_rotation(ch) @ [0.0, 0.0, 1.0])[2])))
        tilt_down = np.degrees(np.arccos(-(camera_rotation(ch) @ [0.0, 1.0, 0.0])[2]))
        assert 0.3 < tilt_axis < 1.2 and 0.4 < tilt_down < 1.3, (ch, tilt_axis, tilt_down)
    up = lidar_rotation() @ [0.0, 0.0, 1.0]
    assert 0.5 < np.degrees(np.arccos(up[2])) < 1.0
    assert np.allclose(lidar_rotation(tilted=False), make_transform(yaw_to_quat(LIDAR_YAW), [0, 0, 0])[:3, :3])
    k = camera_intrinsics("CAM_FRONT", 400, 225)
    assert np.isclose(k[0, 0], 1266.4 / 4) and np.isclose(k[1, 2], 491.5 / 4)
    # lidar: x to the right of the car, y forward
    lidar2ego = make_transform(yaw_to_quat(LIDAR_YAW), [0, 0, 0])
    assert np.allclose(transform_points(lidar2ego, np.array([[1.0, 0, 0], [0, 1.0, 0]])),
                       [[0, -1, 0], [1, 0, 0]], atol=1e-12)
    assert np.allclose(camera_to_ego("CAM_BACK")[:3, 3], [0.03, 0.0, 1.57])


def test_road_is_arc_length_parametrised_and_smooth():
    rng = np.random.default_rng(3)
    road = make_road(rng, (100.0, 200.0), -50.0, 300.0)
    xy0, _ = road.frame(0.0)
    assert np.allclose(xy0, [100.0, 200.0], atol=1e-6)
    seg = np.linalg.norm(np.diff(road.xy, axis=0), axis=1)
    assert np.allclose(seg, road.s[1] - road.s[0], rtol=1e-4)
    assert np.abs(road.kappa).max() < 1 / 70
    # the heading is the direction of the centre line
    tangent = np.arctan2(*np.diff(road.xy, axis=0).T[::-1])
    assert np.abs(np.angle(np.exp(1j * (tangent - road.heading[:-1])))).max() < 2e-3
    # an offset point is at the right distance to the left
    p, th = road.frame(37.0, 2.5)
    c, _ = road.frame(37.0, 0.0)
    assert np.isclose(np.linalg.norm(p - c), 2.5) and np.isclose(np.cross([np.cos(th), np.sin(th)], p - c), 2.5)


def test_ego_speed_and_pose():
    rng = np.random.default_rng(5)
    ego = make_ego(rng, None)
    ego.road = make_road(rng, (0.0, 0.0), -50.0, 400.0)
    t = np.linspace(0.0, 20.0, 2001)
    arc = ego.arc(t)
    speed = np.gradient(arc, t)
    expect = ego.v0 + ego.dv * np.sin(2 * np.pi / ego.period * t + ego.phase)
    assert np.abs(speed - expect)[1:-1].max() < 1e-3
    assert arc[0] == 0.0 and (np.diff(arc) > 0).all()
    pose = ego.pose(np.array([0.0, 10.0]))
    xy, th = ego.road.frame(arc[[0, 1000]], EGO_OFFSET)
    assert np.allclose(pose[:, :2, 3], xy) and np.allclose(pose[:, 2, 3], 0.0)
    assert np.allclose(np.arctan2(pose[:, 1, 0], pose[:, 0, 0]), np.angle(np.exp(1j * th)))


@pytest.mark.parametrize("omega", [0.0, 0.2, -0.35])
def test_object_track_constant_speed_and_yaw_rate(omega):
    tr = ObjectTrack(key="x", category="vehicle.car", size=(2.0, 4.5, 1.6), x0=10.0, y0=-3.0, yaw0=0.7,
                     v=8.0, omega=omega, t_ref=2.0, t_in=0.5, t_out=6.0)
    t = np.linspace(0.0, 8.0, 8001)
    b = tr.boxes(t)                                      # (T, 7)
    assert np.allclose(tr.boxes(np.array(2.0))[:2], [10.0, -3.0])
    vel = np.gradient(b[:, :2], t, axis=0)
    assert np.allclose(np.linalg.norm(vel, axis=1)[1:-1], 8.0, atol=1e-4)
    # velocity points along the heading, and the heading turns at omega
    assert np.allclose(np.arctan2(vel[1:-1, 1], vel[1:-1, 0]), np.angle(np.exp(1j * b[1:-1, 6])), atol=1e-3)
    dyaw = np.angle(np.exp(1j * np.diff(b[:, 6])))
    assert np.allclose(dyaw / np.diff(t), omega, atol=1e-9)
    assert np.allclose(b[:, 2], 0.8) and np.allclose(b[:, 3:6], [2.0, 4.5, 1.6])
    assert np.array_equal(tr.present(np.array([0.4, 0.5, 6.0, 6.1])), [False, True, True, False])


def test_objects_cover_categories_with_blinking_instances():
    rng = np.random.default_rng(0)
    ego = make_ego(rng, None)
    ego.road = make_road(rng, (0.0, 0.0), -100.0, 400.0)
    tracks = make_objects(rng, ego.road, ego, 20.0)
    cats = {t.category for t in tracks}
    assert cats == set(CATEGORY_SPECS)
    for cat in cats:
        inside = [t for t in tracks if t.category == cat and 0 < t.t_in and t.t_out < 20.0]
        assert inside and all(t.t_out - t.t_in >= 1.5 for t in inside), cat


def test_keyframe_indices():
    for n in (11, 24, 72, 240, 241):
        for seed in range(5):
            kf = keyframe_indices(np.random.default_rng(seed), n)
            assert kf[0] == 0 and kf[-1] == n - 1
            assert set(np.diff(kf)) <= {5, 6, 7}
            kf = keyframe_indices(np.random.default_rng(seed), n, (4, 7))
            assert kf[0] == 0 and kf[-1] == n - 1 and set(np.diff(kf)) <= {4, 5, 6, 7}
    gaps = np.diff(keyframe_indices(np.random.default_rng(0), 241, (4, 7)))
    assert {4, 7} & set(gaps) and 5.5 < gaps.mean() < 6.5


def test_trigger_rounds_follow_the_lidar():
    """12 camera rounds per 20 lidar sweeps, 1 or 2 sweeps (50 / 100 ms) apart, as in nuScenes."""
    for seed in range(3):
        sweep = trigger_rounds(np.random.default_rng(seed), 241)
        steps = np.diff(sweep)
        assert sweep[0] == 0 and set(steps) == {1, 2} and sum(TRIGGER_SWEEPS) == 5
        assert sweep[-1] == 400            # 240 steps of 5/3 sweeps = 20 s of 20 Hz sweeps
        assert not np.any((steps[1:] == 1) & (steps[:-1] == 1))


def test_clip_near_plane():
    quad = np.array([[-1.0, 0, -1.0], [1.0, 0, -1.0], [1.0, 0, 3.0], [-1.0, 0, 3.0]])
    out = clip_near(quad, near=1.0)
    assert (out[:, 2] >= 1.0 - 1e-12).all() and len(out) == 4
    assert np.allclose(sorted(map(tuple, out.round(9))), sorted([(1.0, 0, 1.0), (1.0, 0, 3.0), (-1.0, 0, 3.0),
                                                                 (-1.0, 0, 1.0)]))
    assert len(clip_near(quad - [0, 0, 10], near=1.0)) == 0
    assert clip_near(quad + [0, 0, 10], near=1.0) is not None and len(clip_near(quad + [0, 0, 10])) == 4
    tri = np.array([[0.0, 0, 0.0], [2.0, 0, 2.0], [-2.0, 0, 2.0]])
    out = clip_near(tri, near=1.0)                      # cut corner -> quad
    assert len(out) == 4 and np.isclose(out[:, 2].min(), 1.0)
