"""The time model on hand-made tracks with known answers: interpolation at any time, extrapolation by at most
one camera period at track ends, holding a single annotation, per-view boxes in LiDAR(t)."""
from __future__ import annotations

import numpy as np

from pipeline.contract.geometry import make_transform, yaw_to_quat
from pipeline.scenes.interpolate import EXTRAPOLATE_US, KeyframeAnnotations, interpolate_boxes, interpolate_global


def _ann():
    """Instance 0: x = 10 m/s * t, yaw = 0.2 rad/s * t, annotated at 0, 0.5, 1.0 s. Instance 1: only at 0.5 s.
    Instance 2: at 0 and 1.0 s but not at 0.5 s (absent in between)."""
    key_ts = np.array([0, 500_000, 1_000_000], np.int64)
    t = key_ts / 1e6
    present = np.array([[1, 0, 1], [1, 1, 0], [1, 0, 1]], bool)
    centre = np.zeros((3, 3, 3))
    centre[:, 0, 0] = 10 * t
    centre[:, 1] = [5.0, 5.0, 1.0]
    centre[:, 2, 1] = -3.0
    quat = np.zeros((3, 3, 4))
    quat[..., 0] = 1.0
    quat[:, 0] = yaw_to_quat(0.2 * t)
    return KeyframeAnnotations(instance_tokens=["a", "b", "c"], box_class=np.zeros(3, np.int8), key_ts=key_ts,
                               sample_tokens=["s0", "s1", "s2"], present=present, centre=centre,
                               size=np.ones((3, 3, 3)), quat=quat, visibility=np.full((3, 3), 4, np.int8),
                               num_lidar_pts=np.ones((3, 3), np.int32), records=[])


def test_interpolation_and_track_end_rule():
    ann = _ann()
    ts = np.array([-100_000, -50_000, 0, 250_000, 500_000, 1_040_000, 1_083_334, 1_090_000], np.int64)
    g = interpolate_global(ann, ts)
    # instance 0: exact on its constant-velocity track, within one camera period beyond both ends
    np.testing.assert_array_equal(g.mask[:, 0], [False, True, True, True, True, True, True, False])
    live = g.mask[:, 0]
    np.testing.assert_allclose(g.boxes[live, 0, 0], 10 * ts[live] / 1e6, atol=1e-9)
    np.testing.assert_allclose(g.boxes[live, 0, 6], 0.2 * ts[live] / 1e6, atol=1e-12)
    # instance 1 (one annotation at 0.5 s): held there, present only within 83.3 ms of it
    np.testing.assert_array_equal(g.mask[:, 1], [False, False, False, False, True, False, False, False])
    g1 = interpolate_global(ann, np.array([500_000 - EXTRAPOLATE_US, 500_000 + EXTRAPOLATE_US + 1]))
    assert g1.mask[0, 1] and not g1.mask[1, 1] and np.allclose(g1.boxes[0, 1, :3], [5.0, 5.0, 1.0])
    # instance 2: annotated at 0 and 1 s, not at 0.5 s -> absent in between beyond the extrapolation
    assert g.mask[2, 2] and not g.mask[3, 2] and not g.mask[4, 2]


def test_reference_and_view_boxes_in_lidar_t():
    ann = _ann()
    # LiDAR(t) at x = 2 m, rotated 90 deg: a global point (x, 0) is at LiDAR (0, -(x - 2))
    l2g = make_transform(yaw_to_quat(np.pi / 2), [2.0, 0.0, 0.0])[None].repeat(2, 0)
    ts = np.array([250_000, 750_000], np.int64)
    views = ts[:, None] + np.array([-7_600, 0, 35_000])                  # (F, V) exposures
    ib = interpolate_boxes(ann, ts, l2g, views)
    assert ib.view_boxes.shape == (2, 3, 3, 7) and ib.view_box_mask.shape == (2, 3, 3)
    np.testing.assert_allclose(ib.boxes[:, 0, 1], -(10 * ts / 1e6 - 2.0), atol=1e-5)
    np.testing.assert_allclose(ib.view_boxes[:, :, 0, 1], -(10 * views / 1e6 - 2.0), atol=1e-5)
    np.testing.assert_allclose(ib.view_boxes[:, 1], ib.boxes, atol=1e-6)   # the zero-offset view = reference
    np.testing.assert_allclose(ib.boxes[:, 0, 6], 0.2 * ts / 1e6 - np.pi / 2, atol=1e-6)


def test_an_object_in_the_frame_has_a_box_in_every_view():
    """CAM_FRONT within the extrapolation, a later view just beyond it: the view still gets the box."""
    ann = _ann()
    l2g = np.eye(4)[None]
    ts = np.array([1_060_000], np.int64)                                  # 60 ms after the last annotation
    views = ts[:, None] + np.array([0, 35_000])                          # the second view 95 ms after it
    ib = interpolate_boxes(ann, ts, l2g, views)
    assert ib.box_mask[0, 0] and ib.view_box_mask[0, :, 0].all()
    np.testing.assert_allclose(ib.view_boxes[0, 1, 0, 0], 10.95, atol=1e-5)
    far = interpolate_boxes(ann, ts + 40_000, l2g, views + 40_000)        # CAM_FRONT beyond: nobody
    assert not far.box_mask[0, 0] and not far.view_box_mask[0, :, 0].any()
