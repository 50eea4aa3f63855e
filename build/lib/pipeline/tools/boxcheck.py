"""Measure box conditions the way the model uses them: project each object through a clip's own
``view_boxes`` + ``cam2lidar`` + ``intrinsics`` and compare with where the synthetic renderer drew it
(its truth box at that camera's own timestamp, through that camera's true pose, from
``synth_truth.parquet``). Used by tests/test_exposure_geometry.py and bench/interpolate.py.

Errors are in pixels scaled to a 1600 px wide image (``REF_WIDTH``), over every (frame, view,
object) whose true centre lies in front of the camera and inside the image and that the clip has
a box for; drawn objects without a box are counted separately (``missing_*``).
"""
from __future__ import annotations

import numpy as np

from pipeline.contract.geometry import invert_transform, make_transform, project, transform_points

REF_WIDTH = 1600
MIN_DEPTH_M = 1.0


def truth_at_views(truth, scene_name: str, instance_tokens: np.ndarray, views: list[str],
                   view_timestamps_us: np.ndarray) -> dict[str, np.ndarray]:
    """Truth rows joined on (channel, timestamp, instance) for T x V exposures and N instances (a repaired view-frame
    is joined with the truth of the image it uses, at that image's own timestamp):
    centre (T, V, N, 3) global, present (T, V, N), cam2global (T, V, 4, 4) true camera poses, found (T, V)."""
    import pyarrow.compute as pc
    t = truth.filter(pc.equal(truth["scene_name"], scene_name))
    cols = {c: t[c].to_numpy(zero_copy_only=False) for c in ("channel", "timestamp_us", "instance_token", "x", "y",
                                                             "z", "present", "cam_x", "cam_y", "cam_z", "cam_qw",
                                                             "cam_qx", "cam_qy", "cam_qz")}
    tt, vv = view_timestamps_us.shape
    n = len(instance_tokens)
    slots: dict[tuple, list] = {}   # (view, exposure) -> its (frame, view) slots: a repaired drop shares its image's
    for (i, j), ts in np.ndenumerate(view_timestamps_us):
        slots.setdefault((views[j], int(ts)), []).append((i, j))
    col = {tok: k for k, tok in enumerate(instance_tokens)}
    centre = np.zeros((tt, vv, n, 3))
    present = np.zeros((tt, vv, n), bool)
    quat, trans = np.tile([1.0, 0, 0, 0], (tt, vv, 1)), np.zeros((tt, vv, 3))
    found = np.zeros((tt, vv), bool)
    for r, (ch, ts, tok) in enumerate(zip(cols["channel"], cols["timestamp_us"], cols["instance_token"])):
        for ij in slots.get((ch, int(ts)), ()):
            found[ij] = True
            quat[ij] = [cols[c][r] for c in ("cam_qw", "cam_qx", "cam_qy", "cam_qz")]
            trans[ij] = [cols[c][r] for c in ("cam_x", "cam_y", "cam_z")]
            k = col.get(tok)
            if k is not None:
                centre[ij + (k,)] = [cols["x"][r], cols["y"][r], cols["z"][r]]
                present[ij + (k,)] = bool(cols["present"][r])
    return {"centre": centre, "present": present, "cam2global": make_transform(quat, trans), "found": found}


def projection_errors(view_boxes: np.ndarray, view_mask: np.ndarray, cam2lidar: np.ndarray, intrinsics: np.ndarray,
                      width: int, height: int, truth: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """view_boxes (T, V, N, 7) in LiDAR(t); view_mask (T, V, N); cam2lidar (T, V, 4, 4); intrinsics (V, 3, 3) at
    width x height; truth from ``truth_at_views``. Returns err_px (M,) at REF_WIDTH with view (M,) and frame (M,)
    indices for the M drawn objects the clip has a box for, and missing_frame / missing_view of drawn objects
    without a box (an object that appears or leaves between two annotations, beyond the extrapolation)."""
    k = np.asarray(intrinsics, np.float64)[None]                                  # (1, V, 3, 3)
    ours_cam = transform_points(invert_transform(np.asarray(cam2lidar, np.float64)),
                                np.asarray(view_boxes, np.float64)[..., :3])      # (T, V, N, 3)
    uv, _ = project(ours_cam, k)                                                  # (T, V, N, 2)
    true_cam = transform_points(invert_transform(truth["cam2global"]), truth["centre"])
    tuv, depth = project(true_cam, k)
    seen = (truth["present"] & truth["found"][..., None] & (depth > MIN_DEPTH_M) & (tuv[..., 0] >= 0)
            & (tuv[..., 0] < width) & (tuv[..., 1] >= 0) & (tuv[..., 1] < height))   # (T, V, N)
    err = np.linalg.norm(uv - tuv, axis=-1) * (REF_WIDTH / width)
    have = seen & np.asarray(view_mask, bool)
    f, v, _ = np.nonzero(have)
    mf, mv, _ = np.nonzero(seen & ~have)
    return {"err_px": err[have], "view": v, "frame": f, "missing_frame": mf, "missing_view": mv}


def summary(errors: dict[str, np.ndarray], views: list[str]) -> dict[str, dict[str, float]]:
    """Per view and "all": median / p95 / max pixel error and the count."""
    out = {}
    for name, sel in [(v, errors["view"] == j) for j, v in enumerate(views)] + [("all", slice(None))]:
        e = errors["err_px"][sel]
        out[name] = {"median": float(np.median(e)) if e.size else float("nan"),
                     "p95": float(np.percentile(e, 95)) if e.size else float("nan"),
                     "max": float(e.max()) if e.size else float("nan"), "n": int(e.size)}
    return out
