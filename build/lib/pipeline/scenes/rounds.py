"""Trigger rounds and dropped-image repair: the numpy half of pipeline/scenes/nuscenes.py's timeline.

nuScenes' 20 Hz LiDAR triggers the cameras as it sweeps past them (12 rounds per 20 sweeps), and under
load the logger drops images, each camera on its own (nuscenes-devkit #1025, #1178). Two repairs:

- ``dropped_front_rounds``: a round whose CAM_FRONT image was dropped leaves a hole in CAM_FRONT's
  stream (a step above the rig's longest, 100 ms), but the other cameras usually recorded it: their
  images that no CAM_FRONT round claims, moved back by their rig offsets, cluster at the missing
  round. Its reference time is the round's trigger: the LIDAR_TOP sweep at that round minus
  CAM_FRONT's lead on the sweep (``trigger_time``), so the other views' images of that round are used.
- ``nearest_fill``: a view whose image of round t is missing takes the nearest recorded image of the
  same camera (previous or next round, the closer in time to the expected exposure).

``missing_runs`` measures what a clip may hold: runs of consecutive missing images of one camera.
"""
from __future__ import annotations

import numpy as np


def dropped_front_rounds(front_ts: np.ndarray, others: list[np.ndarray], tol_us: int, min_hole_us: int) -> np.ndarray:
    """(R,) estimated CAM_FRONT times of the rounds missing from ``front_ts`` (F,) sorted CAM_FRONT times.

    ``others``: per non-reference camera, its image times minus its rig offset (the CAM_FRONT time each
    implies). An implied time more than ``tol_us`` from every CAM_FRONT time, inside a CAM_FRONT step longer
    than ``min_hole_us``, is a dropped round's; the implied times of one round (within ``tol_us``) are one
    round, at their median."""
    front_ts = np.asarray(front_ts, np.int64)
    if len(front_ts) < 2 or not others:
        return np.zeros(0, np.int64)
    x = np.sort(np.concatenate([np.asarray(o, np.int64).reshape(-1) for o in others]))
    i = np.clip(np.searchsorted(front_ts, x), 1, len(front_ts) - 1)
    lo, hi = front_ts[i - 1], front_ts[i]
    inside = (x > front_ts[0]) & (x < front_ts[-1])
    hole = (hi - lo) > min_hole_us
    far = (x - lo > tol_us) & (hi - x > tol_us)
    x = x[inside & hole & far]
    if not len(x):
        return np.zeros(0, np.int64)
    groups = np.split(x, np.flatnonzero(np.diff(x) > tol_us) + 1)
    return np.array([int(np.round(np.median(g))) for g in groups], np.int64)


def trigger_time(estimate: np.ndarray, lidar_ts: np.ndarray, lead_us: float, tol_us: int) -> np.ndarray:
    """The round's reference time from its trigger: the LIDAR_TOP sweep nearest ``estimate`` + ``lead_us``
    (CAM_FRONT fires ``lead_us`` before its sweep), minus the lead; the estimate itself when no sweep lies
    within ``tol_us`` (e.g. a rig whose cameras are not lidar-triggered)."""
    est = np.asarray(estimate, np.int64)
    lidar_ts = np.asarray(lidar_ts, np.int64)
    if not len(est) or not len(lidar_ts):
        return est
    want = est + int(round(lead_us))
    i = np.clip(np.searchsorted(lidar_ts, want), 1, len(lidar_ts) - 1) if len(lidar_ts) > 1 else np.zeros_like(est)
    near = np.where(np.abs(lidar_ts[i - 1] - want) <= np.abs(lidar_ts[i] - want), lidar_ts[i - 1], lidar_ts[i]) \
        if len(lidar_ts) > 1 else np.full_like(est, lidar_ts[0])
    return np.where(np.abs(near - want) <= tol_us, near - int(round(lead_us)), est)


def nearest_fill(recorded: np.ndarray, expected_ts: np.ndarray, image_ts: np.ndarray) -> np.ndarray:
    """(F, V) int: the round whose image view v uses at round t; t itself where ``recorded``, else the nearest
    recorded round of that camera before or after (the one whose image time is closer to ``expected_ts``,
    the earlier on a tie); -1 when the camera recorded nothing.

    ``recorded`` (F, V) bool, ``expected_ts`` (F, V) the expected exposure of each round, ``image_ts`` (F, V)
    the recorded images' times (read where ``recorded``)."""
    f, v = recorded.shape
    out = np.tile(np.arange(f)[:, None], (1, v))
    for j in range(v):
        have = np.flatnonzero(recorded[:, j])
        miss = np.flatnonzero(~recorded[:, j])
        if not len(miss):
            continue
        if not len(have):
            out[miss, j] = -1
            continue
        k = np.searchsorted(have, miss)
        prev, nxt = have[np.maximum(k - 1, 0)], have[np.minimum(k, len(have) - 1)]
        d_prev = np.where(k > 0, np.abs(image_ts[prev, j] - expected_ts[miss, j]), np.iinfo(np.int64).max)
        d_next = np.where(k < len(have), np.abs(image_ts[nxt, j] - expected_ts[miss, j]), np.iinfo(np.int64).max)
        out[miss, j] = np.where(d_prev <= d_next, prev, nxt)
    return out


def missing_runs(recorded: np.ndarray) -> list[tuple[int, int, int]]:
    """(view, first frame, length) of every run of consecutive missing images, by view then frame."""
    runs = []
    for j in range(recorded.shape[1]):
        miss = np.concatenate([[False], ~np.asarray(recorded[:, j], bool), [False]])
        edges = np.flatnonzero(np.diff(miss.astype(np.int8)))
        runs += [(j, int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2])]
    return runs


def run_length(recorded: np.ndarray) -> np.ndarray:
    """(F, V) int: the length of the missing run each view-frame belongs to (0 where recorded)."""
    out = np.zeros(recorded.shape, np.int64)
    for j, a, n in missing_runs(recorded):
        out[a:a + n, j] = n
    return out


def interpolate_pose(times: np.ndarray, poses: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(P,) sorted times with (P, 4, 4) rigid poses -> (Q, 4, 4) poses at the (Q,) times ``t``: linear
    translation and slerped rotation between the bracketing poses (held beyond the ends)."""
    from pipeline.contract.geometry import make_transform, matrix_to_quat, slerp
    times, t = np.asarray(times, np.float64), np.asarray(t, np.float64)
    k = np.clip(np.searchsorted(times, t), 1, len(times) - 1) if len(times) > 1 else np.zeros(len(t), int)
    a, b = np.maximum(k - 1, 0), k
    span = times[b] - times[a]
    alpha = np.clip(np.where(span > 0, (t - times[a]) / np.where(span > 0, span, 1.0), 0.0), 0.0, 1.0)
    q = slerp(matrix_to_quat(poses[a, :3, :3]), matrix_to_quat(poses[b, :3, :3]), alpha)
    xyz = (1 - alpha)[:, None] * poses[a, :3, 3] + alpha[:, None] * poses[b, :3, 3]
    return make_transform(q, xyz)
