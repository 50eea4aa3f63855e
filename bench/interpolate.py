"""Seconds per 20 s scene (240 frames at 12 Hz) for timeline + 2 Hz -> 12 Hz interpolation + BEV maps
(+ writing the zarr store) on one core, vs a baseline measured in the same run: a per-box Python loop
(devkit Box + pyquaternion slerp, frames x boxes) and the devkit's per-frame get_map_mask.
Also reports centre/yaw error of the interpolation vs the synthetic 12 Hz truth.

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


def loop_baseline(nusc, ann, tl):
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", default=None, help="write/reuse the synthetic dataset here")
    a = p.parse_args()
    cv2.setNumThreads(1)
    import pyarrow.parquet as pq
    from pipeline.bevmap import bev_fast_bits, bev_reference, bits_to_packed, map_geometry
    from pipeline.interpolate import errors_vs_truth, interpolate_boxes, load_keyframe_annotations
    from pipeline.nuscenes import build_timeline
    from pipeline.scenestore import build_scene_store, open_scene_store

    root, nusc, name, nusc_map = synthetic_scene(a.keep, "bench_interp_", seed=1)
    map_geometry(nusc_map)  # once per map per process, like the devkit tables
    tl = build_timeline(nusc, name)  # warm-up (first calls into OpenCV/numpy paths)
    bev_fast_bits(nusc_map, tl.lidar2global[:2])

    t_tl, tl = best(lambda: build_timeline(nusc, name))
    t_ann, ann = best(lambda: load_keyframe_annotations(nusc, [s for s in tl.sample_tokens if s]))
    t_int, ib = best(lambda: interpolate_boxes(ann, tl.timestamps_us, tl.sample_tokens, tl.lidar2global))
    t_bev, packed = best(lambda: bits_to_packed(bev_fast_bits(nusc_map, tl.lidar2global)))
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

    e = errors_vs_truth(open_scene_store(uri), pq.read_table(os.path.join(root, "synth_truth.parquet")))
    inter, key = ~e["keyframe"], e["keyframe"]
    acc = {f"{what}_{part}_{stat}": float(fn(e[f"{what}_err"][m]))
           for what in ("centre", "yaw") for part, m in (("interp", inter), ("key", key),
                                                         ("interp_moving", inter & e["moving"]))
           for stat, fn in (("median", np.median), ("p95", lambda x: np.percentile(x, 95)), ("max", np.max))}
    figures = {"frames": f, "objects": len(ann.instance_tokens), "boxes": int(ib.box_mask.sum()),
               "timeline_s": t_tl.seconds, "annotations_s": t_ann.seconds, "interpolation_s": t_int.seconds,
               "bev_s": t_bev.seconds, "total_s": total, "store_build_total_s": t_store.seconds,
               "baseline_loop_interpolation_s": t_loop.seconds, "baseline_devkit_bev_s": ref_bev_s,
               "baseline_total_s": baseline, "speedup_vs_baseline": baseline / total,
               "interpolation_speedup_vs_loop": t_loop.seconds / t_int.seconds, **acc,
               "bev_bytes_packed": int(packed.nbytes), "loop_boxes": n_loop}
    summary = (f"20 s scene ({f} frames, {ib.box_mask.sum()} boxes): timeline {t_tl.seconds:.3f} + annotations "
               f"{t_ann.seconds:.3f} + interpolation {t_int.seconds:.3f} + BEV {t_bev.seconds:.3f} = {total:.2f} s "
               f"(whole store incl. zarr write {t_store.seconds:.2f} s) vs baseline {baseline:.1f} s "
               f"= {baseline / total:.0f}x; interpolation {t_loop.seconds / t_int.seconds:.0f}x vs loop; "
               f"centre err median/p95 {acc['centre_interp_median']:.4f}/{acc['centre_interp_p95']:.4f} m "
               f"(moving objects {acc['centre_interp_moving_median']:.4f}/{acc['centre_interp_moving_p95']:.4f}) "
               f"(keyframes {acc['centre_key_median']:.3f}/{acc['centre_key_p95']:.3f} m), yaw p95 "
               f"{acc['yaw_interp_p95']:.1e} rad")
    save("interpolate", figures, summary)


if __name__ == "__main__":
    main()
