"""Numeric tests of the shared geometry: known poses, known projections, known interpolation."""
from __future__ import annotations

import numpy as np
import pytest
from pyquaternion import Quaternion

from pipeline.contract import geometry as g


def test_quaternion_matches_pyquaternion():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((20, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    for qi, r in zip(q, g.quat_to_matrix(q)):
        np.testing.assert_allclose(r, Quaternion(qi).rotation_matrix, atol=1e-12)
    back = g.matrix_to_quat(g.quat_to_matrix(q))
    np.testing.assert_allclose(np.abs(np.sum(back * q, 1)), 1.0, atol=1e-12)  # same rotation up to sign


def test_yaw_roundtrip_and_wrap():
    yaw = np.array([0.0, 0.5, -3.0, 3.1])
    np.testing.assert_allclose(g.yaw_of_matrix(g.quat_to_matrix(g.yaw_to_quat(yaw))), yaw, atol=1e-12)
    np.testing.assert_allclose(g.wrap_angle(np.array([np.pi, 3 * np.pi / 2, -np.pi])), [-np.pi, -np.pi / 2, -np.pi])


def test_slerp_known_values():
    q0, q1 = g.yaw_to_quat(0.2), g.yaw_to_quat(1.4)
    for a in (0.0, 0.25, 0.5, 1.0):
        q = g.slerp(q0, q1, a)
        assert g.yaw_of_matrix(g.quat_to_matrix(q)) == pytest.approx(0.2 + a * 1.2, abs=1e-12)
    # shortest arc across +-pi
    q = g.slerp(g.yaw_to_quat(3.0), g.yaw_to_quat(-3.0), 0.5)
    assert abs(abs(g.yaw_of_matrix(g.quat_to_matrix(q))) - np.pi) < 1e-9


def test_transforms_known_pose():
    t = g.make_transform(g.yaw_to_quat(np.pi / 2), [10.0, 0.0, 1.0])  # rotate 90 deg, then move
    p = g.transform_points(t, np.array([[1.0, 0.0, 0.0]]))
    np.testing.assert_allclose(p, [[10.0, 1.0, 1.0]], atol=1e-12)
    np.testing.assert_allclose(g.invert_transform(t) @ t, np.eye(4), atol=1e-12)
    box = np.array([1.0, 0.0, 0.0, 2.0, 4.0, 1.5, 0.3])
    moved = g.transform_boxes(t, box)
    np.testing.assert_allclose(moved[:3], [10.0, 1.0, 1.0], atol=1e-12)
    assert moved[6] == pytest.approx(0.3 + np.pi / 2)


def test_box_corners_known_box():
    c = g.box_corners(np.array([0.0, 0.0, 0.0, 2.0, 4.0, 2.0, np.pi / 2]))  # l=4 along +y after 90 deg yaw
    assert c.shape == (8, 3)
    np.testing.assert_allclose(c.min(0), [-1, -2, -1], atol=1e-12)
    np.testing.assert_allclose(c.max(0), [1, 2, 1], atol=1e-12)
    np.testing.assert_allclose(c[:4, 2], -1)
    np.testing.assert_allclose(c[4:, 2], 1)


def test_projection_and_visibility():
    k = np.array([[100.0, 0, 64], [0, 100.0, 32], [0, 0, 1]])
    uv, depth = g.project(np.array([[1.0, 0.5, 10.0]]), k)
    np.testing.assert_allclose(uv, [[74.0, 37.0]])
    assert depth[0] == 10.0
    # camera looking along LiDAR +y (nuScenes front camera: cam z = lidar y, cam x = lidar x, cam y = -lidar z)
    cam2lidar = np.eye(4)
    cam2lidar[:3, :3] = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], float)
    boxes = np.array([[[0.0, 10.0, 0.0, 1, 1, 1, 0],     # ahead: visible
                       [0.0, -10.0, 0.0, 1, 1, 1, 0],    # behind: not
                       [200.0, 10.0, 0.0, 1, 1, 1, 0]]])  # far right, outside the image
    vis = g.box_view_visibility(boxes, k[None], cam2lidar[None], 128, 64)
    assert vis.shape == (1, 1, 3)
    assert vis[0, 0].tolist() == [True, False, False]


def test_resize_crop_intrinsics():
    k = np.array([[1266.0, 0, 816.0], [0, 1266.0, 491.0], [0, 0, 1]])
    k2 = g.resize_crop_intrinsics(k, (1600, 900), 1600, 848)  # crop 52 top rows
    assert k2[1, 2] == pytest.approx(491.0 - 52) and k2[0, 0] == pytest.approx(1266.0)
    k3 = g.resize_crop_intrinsics(k, (1600, 900), 400, 224)   # scale 0.25 -> 225 rows, crop 1
    assert k3[0, 0] == pytest.approx(316.5) and k3[1, 2] == pytest.approx(491.0 / 4 - 1)
    with pytest.raises(ValueError, match="fewer than the bucket height"):
        g.resize_crop_intrinsics(k, (1600, 900), 112, 64)
