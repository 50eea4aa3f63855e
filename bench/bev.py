"""BEV maps: fast path (rasterise once per scene + warp per frame) vs the devkit's per-frame
NuScenesMap.get_map_mask on the same frames of a 20 s synthetic scene; speed ratio and per-class IoU.

    python bench/bev.py [--frames-step 1] [--keep DIR]
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
from _common import Timer, best, save, synthetic_scene  # noqa: E402

import cv2  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames-step", type=int, default=1, help="use every k-th frame for both paths")
    p.add_argument("--keep", default=None, help="write/reuse the synthetic dataset here")
    a = p.parse_args()
    cv2.setNumThreads(1)
    from pipeline.contract import schema
    from pipeline.scenes.bevmap import BevConfig, bev_fast_bits, bev_reference, bits_to_masks, map_geometry, per_class_iou
    from pipeline.scenes.nuscenes import build_timeline

    _, nusc, name, nusc_map = synthetic_scene(a.keep, "bench_bev_", seed=0)
    tl = build_timeline(nusc, name, check_files=False)
    poses = tl.lidar2global[::a.frames_step]
    with Timer() as t_geo:
        map_geometry(nusc_map)   # once per map per process
    bits = bev_fast_bits(nusc_map, poses[:2])  # warm-up

    t_fast, bits = best(lambda: bev_fast_bits(nusc_map, poses), 7)
    ref_poses = poses[::2]   # the devkit path is slow: every 2nd frame, per-frame cost compared
    t_ref, ref = best(lambda: bev_reference(nusc_map, ref_poses), 3)
    iou = per_class_iou(bits_to_masks(bits)[::2], ref)
    f = len(poses)
    t_ref.seconds *= f / len(ref_poses)
    ratio = t_ref.seconds / t_fast.seconds
    figures = {"frames": f, "fast_s": t_fast.seconds, "fast_ms_per_frame": 1e3 * t_fast.seconds / f,
               "map_geometry_once_s": t_geo.seconds, "devkit_s": t_ref.seconds,
               "devkit_ms_per_frame": 1e3 * t_ref.seconds / f, "speedup_vs_devkit": ratio,
               "iou": iou, "config": BevConfig().__dict__}
    poly = {k: v for k, v in iou.items() if k in schema.MAP_POLYGON_CLASSES}
    summary = (f"{f} frames: fast {1e3 * t_fast.seconds / f:.2f} ms/frame vs devkit {1e3 * t_ref.seconds / f:.1f} "
               f"ms/frame = {ratio:.0f}x; IoU " + " ".join(f"{k}={v:.3f}" for k, v in iou.items())
               + f"; min polygon IoU {min(poly.values()):.3f}")
    save("bev", figures, summary)


if __name__ == "__main__":
    main()
