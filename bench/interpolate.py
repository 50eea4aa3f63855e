"""Seconds per 20 s scene (240 frames at 12 Hz) for timeline + 2 Hz -> 12 Hz interpolation at every view's
exposure + BEV maps (+ writing the zarr store) on one core, vs a baseline measured in the same run: a per-box
Python loop (devkit Box + pyquaternion slerp, frames x boxes) and the devkit's per-frame get_map_mask.

Accuracy on the synthetic truth (pipeline/tools/boxcheck.py): every drawn object projected through the clip's
view boxes + cam2lidar + intrinsics vs the truth at that camera's timestamp through its true pose, per view
median/p95/max in px at 1600 px width, BEFORE (the schema-1 convention, computed here: annotations
unchanged at keyframes, interpolation at CAM_FRONT's time, one box for all views, static cam2lidar) and
AFTER (the scene store); the reference-box centre error vs the truth at CAM_FRONT's time; and linear+slerp
vs a cubic Hermite (Catmull-Rom) centre rule on the truth and on noisy annotations (overshoot).

    python bench/interpolate.py [--keep DIR]
"""
from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
from _common import Timer, best, save, synthetic_scene  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402


def loop_baseline(nusc, ann, tl):  # noqa: ARG001
    """The obvious per-frame, per-box Python implementation (what the vectorised one replaces)."""
    from nuscenes.utils.data_classes import Box
    from pyquaternion import Quaternion
    lidar2global = tl.lidar2global
    out = 0
    for f, ts in enumerate(tl.timestamps_us):
        k = max(0, min(int(np.searchsorted(ann.key_ts, ts, side="right")) - 1, len(ann.key_ts) - 2))
        a = (ts - ann.key_ts[k]) / (ann.key_ts[k + 1] - ann.key_ts[k])
        inv = np.linalg.inv(lidar2global[f])
        for i in range(len(ann.instance_tokens)):
            if not (ann.present[k, i] and ann.present[k + 1, i]):
                continue
            q = Quaternion.slerp(Quaternion(ann.quat[k, i]), Quaternion(ann.quat[k + 1, i]), a)
            box = Box((1 - a) * ann.centre[k, i] + a * ann.centre[k + 1, i],
                      (1 - a) * ann.size[k, i] + a * ann.size[k + 1, i], q)
            box.rotate(Quaternion(matrix=inv[:3, :3], atol=1e-6))
            box.translate(inv[:3, 3])
            out += 1
    return out


def projection_tables(sa, tl, ann, truth):
    """Per-view pixel errors before (schema-1 convention) and after (the store), and the before reference error."""
    from types import SimpleNamespace
    from pipeline.tools.boxcheck import projection_errors, summary, truth_at_views
    from pipeline.shards.clips import clip_geometry
    from pipeline.scenes.interpolate import errors_vs_truth, interpolate_boxes
    f = sa.num_frames
    g = clip_geometry(sa, 0, f, 900, 1600)                              # the shard members at 1600 px width
    tr = truth_at_views(truth, sa.scene_name, sa.instance_tokens, sa.views, sa.view_timestamps_us)
    after = projection_errors(sa.view_boxes, sa.view_box_mask, g["cam2lidar"], g["intrinsics"], 1600, 900, tr)
    # schema 1: keyframe frames carry the annotation (the sample's time), others CAM_FRONT's time, no extrapolation
    old_t = tl.timestamps_us.copy()
    old_t[tl.keyframe] = ann.key_ts
    old = interpolate_boxes(ann, old_t, tl.lidar2global, extrapolate_us=0)
    v = len(sa.views)
    before = projection_errors(np.repeat(old.boxes[:, None], v, 1), np.repeat(old.box_mask[:, None], v, 1),
                               np.broadcast_to(tl.cam2lidar, (f, v, 4, 4)), g["intrinsics"], 1600, 900, tr)
    e_old = errors_vs_truth(SimpleNamespace(scene_name=sa.scene_name, instance_tokens=sa.instance_tokens,
                                            timestamps_us=sa.timestamps_us, box_mask=old.box_mask, boxes=old.boxes,
                                            lidar2global=sa.lidar2global, keyframe=sa.keyframe), truth)
    ref = {f"{part}_{stat}": float(fn(e_old["centre_err"][m])) for part, m in
           (("all", slice(None)), ("key", e_old["keyframe"]), ("interp", ~e_old["keyframe"]))
           for stat, fn in (("median", np.median), ("p95", lambda x: np.percentile(x, 95)), ("max", np.max))}
    return {"before": summary(before, sa.views), "after": summary(after, sa.views),
            "after_missing": int(len(after["missing_frame"]))}, ref


def _hermite(ann, ts, noise=None):
    """Catmull-Rom centres (tangents from the neighbouring annotations, one-sided at track ends) at (S,) times
    between two annotations of each instance; returns (S, N, 3) and the (S, N) mask where both exist."""
    c = ann.centre if noise is None else ann.centre + noise
    k = len(ann.key_ts)
    k0 = np.clip(np.searchsorted(ann.key_ts, ts, side="right") - 1, 0, k - 2)
    k1 = k0 + 1
    t0, t1 = ann.key_ts[k0].astype(float), ann.key_ts[k1].astype(float)
    h = (t1 - t0)[:, None, None]
    s = ((ts - t0) / (t1 - t0))[:, None, None]

    def tangent(i):                                             # (S, N, 3) velocity at annotation i
        lo, hi = np.clip(i - 1, 0, k - 1), np.clip(i + 1, 0, k - 1)
        ok_lo = ann.present[lo] & (i - 1 >= 0)[:, None]
        ok_hi = ann.present[hi] & (i + 1 <= k - 1)[:, None]
        a = np.where(ok_lo[..., None], c[lo], c[i])
        b = np.where(ok_hi[..., None], c[hi], c[i])
        ta = np.where(ok_lo, ann.key_ts[lo][:, None], ann.key_ts[i][:, None]).astype(float)
        tb = np.where(ok_hi, ann.key_ts[hi][:, None], ann.key_ts[i][:, None]).astype(float)
        return (b - a) / np.maximum(tb - ta, 1.0)[..., None]

    m0, m1 = tangent(k0) * h, tangent(k1) * h
    h00, h10, h01, h11 = 2 * s**3 - 3 * s**2 + 1, s**3 - 2 * s**2 + s, -2 * s**3 + 3 * s**2, s**3 - s**2
    out = h00 * c[k0] + h10 * m0 + h01 * c[k1] + h11 * m1
    return out, ann.present[k0] & ann.present[k1] & (ts >= ann.key_ts[0])[:, None] & (ts <= ann.key_ts[-1])[:, None]


def interpolator_comparison(ann, sa, truth, noise_m: float = 0.05, seed: int = 0):
    """Centre error of linear vs cubic Hermite at CAM_FRONT times on the truth; and with annotation noise
    (sigma noise_m per axis) their overshoot: how far the curve leaves the box spanned by the segment's ends."""
    from pipeline.tools.boxcheck import truth_at_views
    from pipeline.scenes.interpolate import interpolate_global
    ts = sa.timestamps_us
    tr = truth_at_views(truth, sa.scene_name, sa.instance_tokens, ["CAM_FRONT"], ts[:, None])
    true_c, present = tr["centre"][:, 0], tr["present"][:, 0]                     # (F, N, 3), (F, N)
    out = {}
    noise = np.random.default_rng(seed).normal(0.0, noise_m, ann.centre.shape)
    for tag, nz in (("", None), ("noisy_", noise)):
        a = ann if nz is None else type(ann)(**{**ann.__dict__, "centre": ann.centre + nz})
        lin = interpolate_global(a, ts, extrapolate_us=0)
        her, hm = _hermite(ann, ts, nz)
        both = lin.mask & hm & present
        for name, cen in (("linear", lin.boxes[..., :3]), ("hermite", her)):
            err = np.linalg.norm(cen - true_c, axis=-1)[both]
            out[f"{tag}{name}_median"] = float(np.median(err))
            out[f"{tag}{name}_p95"] = float(np.percentile(err, 95))
            out[f"{tag}{name}_max"] = float(err.max())
            k0 = np.clip(np.searchsorted(a.key_ts, ts, side="right") - 1, 0, len(a.key_ts) - 2)
            lo = np.minimum(a.centre[k0], a.centre[k0 + 1])
            hi = np.maximum(a.centre[k0], a.centre[k0 + 1])
            over = np.linalg.norm(np.maximum(lo - cen, 0) + np.maximum(cen - hi, 0), axis=-1)[both]
            out[f"{tag}{name}_overshoot_max"] = float(over.max())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", default=None, help="write/reuse the synthetic dataset here")
    a = p.parse_args()
    cv2.setNumThreads(1)
    import pyarrow.parquet as pq
    from pipeline.scenes.bevmap import bev_fast_bits, bev_grids_packed, bev_reference, map_geometry
    from pipeline.scenes.interpolate import errors_vs_truth, interpolate_boxes, load_keyframe_annotations
    from pipeline.scenes.nuscenes import build_timeline
    from pipeline.scenes.scenestore import build_scene_store, open_scene_store

    root, nusc, name, nusc_map = synthetic_scene(a.keep, "bench_interp_", seed=1)
    map_geometry(nusc_map)  # once per map per process, like the devkit tables
    tl = build_timeline(nusc, name)  # warm-up (first calls into OpenCV/numpy paths)
    bev_fast_bits(nusc_map, tl.lidar2global[:2])

    t_tl, tl = best(lambda: build_timeline(nusc, name))
    t_ann, ann = best(lambda: load_keyframe_annotations(nusc, [s for s in tl.sample_tokens if s]))
    t_int, ib = best(lambda: interpolate_boxes(ann, tl.timestamps_us, tl.lidar2global, tl.view_timestamps_us))
    t_bev, grids = best(lambda: bev_grids_packed(nusc_map, tl.lidar2global))   # both grids, as the store keeps
    packed = grids[200]
    out = tempfile.mkdtemp(prefix="bench_interp_out_")
    with Timer() as t_store:
        uri = build_scene_store(root, "v1.0-synth", name, out, nusc=nusc, nusc_map=nusc_map, force=True)
    total = t_tl.seconds + t_ann.seconds + t_int.seconds + t_bev.seconds

    with Timer() as t_loop:
        n_loop = loop_baseline(nusc, ann, tl)
    step = 10   # the devkit path is slow: time every 10th frame and scale
    with Timer() as t_ref:
        bev_reference(nusc_map, tl.lidar2global[::step])
    f = tl.num_frames
    ref_bev_s = t_ref.seconds / len(tl.lidar2global[::step]) * f
    baseline = t_tl.seconds + t_ann.seconds + t_loop.seconds + ref_bev_s

    truth = pq.read_table(os.path.join(root, "synth_truth.parquet"))
    sa = open_scene_store(uri)
    e = errors_vs_truth(sa, truth)
    inter, key = ~e["keyframe"], e["keyframe"]
    acc = {f"{what}_{part}_{stat}": float(fn(e[f"{what}_err"][m]))
           for what in ("centre", "yaw") for part, m in (("all", slice(None)), ("interp", inter), ("key", key),
                                                         ("interp_moving", inter & e["moving"]))
           for stat, fn in (("median", np.median), ("p95", lambda x: np.percentile(x, 95)), ("max", np.max))}
    proj, before_ref = projection_tables(sa, tl, ann, truth)
    acc.update({f"centre_before_{k}": v for k, v in before_ref.items()})
    acc.update(interpolator_comparison(ann, sa, truth))
    figures = {"frames": f, "objects": len(ann.instance_tokens), "boxes": int(ib.box_mask.sum()),
               "view_boxes": int(ib.view_box_mask.sum()),
               "timeline_s": t_tl.seconds, "annotations_s": t_ann.seconds, "interpolation_s": t_int.seconds,
               "bev_s": t_bev.seconds, "total_s": total, "store_build_total_s": t_store.seconds,
               "baseline_loop_interpolation_s": t_loop.seconds, "baseline_devkit_bev_s": ref_bev_s,
               "baseline_total_s": baseline, "speedup_vs_baseline": baseline / total,
               "interpolation_speedup_vs_loop": t_loop.seconds / t_int.seconds, **acc, "projection_px": proj,
               "bev_bytes_packed": int(packed.nbytes), "bev_bytes_packed_400": int(grids[400].nbytes),
               "loop_boxes": n_loop}
    b, a_ = proj["before"]["all"], proj["after"]["all"]
    summary = (f"20 s scene ({f} frames, {ib.box_mask.sum()} boxes, {ib.view_box_mask.sum()} view boxes): timeline "
               f"{t_tl.seconds:.3f} + annotations {t_ann.seconds:.3f} + interpolation {t_int.seconds:.3f} + BEV "
               f"{t_bev.seconds:.3f} = {total:.2f} s (whole store incl. zarr write {t_store.seconds:.2f} s) vs "
               f"baseline {baseline:.1f} s = {baseline / total:.0f}x; projection px@1600 median/p95/max before "
               f"{b['median']:.2f}/{b['p95']:.1f}/{b['max']:.0f} -> after {a_['median']:.3f}/{a_['p95']:.2f}/"
               f"{a_['max']:.1f}; reference centre p95 before {before_ref['all_p95']:.3f} m -> after "
               f"{acc['centre_all_p95']:.4f} m (keyframes {before_ref['key_p95']:.3f} -> {acc['centre_key_p95']:.4f}); "
               f"hermite/linear centre p95 {acc['hermite_p95'] / acc['linear_p95']:.2f}, noisy overshoot max "
               f"linear {acc['noisy_linear_overshoot_max']:.3f} / hermite {acc['noisy_hermite_overshoot_max']:.3f} m")
    save("interpolate", figures, summary)


if __name__ == "__main__":
    main()
