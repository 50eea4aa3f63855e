"""BEV maps: fast path (rasterise once per scene + warp per frame) vs the devkit's per-frame
NuScenesMap.get_map_mask on the same frames of a 20 s synthetic scene; speed ratio and per-class IoU, at both
grids of the contract (200 x 0.5 m, 400 x 0.25 m), and the 400 grid's time against the 200 one's.

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
    f = len(poses)
    figures, parts = {"frames": f, "map_geometry_once_s": t_geo.seconds, "config": BevConfig().__dict__}, []
    for cells, cell_m in schema.BEV_GRIDS:   # 200 x 0.5 m (224x400) and 400 x 0.25 m (424x800, 848x1600)
        bev_fast_bits(nusc_map, poses[:2], cells=cells)  # warm-up
        t_fast, bits = best(lambda: bev_fast_bits(nusc_map, poses, cells=cells), 7)
        ref_poses = poses[::2]   # the devkit path is slow: every 2nd frame, per-frame cost compared
        t_ref, ref = best(lambda: bev_reference(nusc_map, ref_poses, cells), 3)
        iou = per_class_iou(bits_to_masks(bits)[::2], ref)
        t_ref.seconds *= f / len(ref_poses)
        ratio = t_ref.seconds / t_fast.seconds
        figures[f"grid_{cells}"] = {"cell_m": cell_m, "fast_s": t_fast.seconds,
                                    "fast_ms_per_frame": 1e3 * t_fast.seconds / f, "devkit_s": t_ref.seconds,
                                    "devkit_ms_per_frame": 1e3 * t_ref.seconds / f, "speedup_vs_devkit": ratio,
                                    "iou": iou}
        poly = {k: v for k, v in iou.items() if k in schema.MAP_POLYGON_CLASSES}
        parts.append(f"{cells}x{cell_m} m: fast {1e3 * t_fast.seconds / f:.2f} ms/frame vs devkit "
                     f"{1e3 * t_ref.seconds / f:.1f} = {ratio:.0f}x, drivable IoU {iou['drivable_area']:.3f}, "
                     f"min polygon IoU {min(poly.values()):.3f}")
    big, small = (figures[f"grid_{c}"]["fast_s"] for c in (schema.BEV_LARGE_CELLS, schema.BEV_CELLS))
    figures["large_vs_small_time"] = big / small
    save("bev", figures, f"{f} frames; " + "; ".join(parts) + f"; 400 grid costs {big / small:.2f}x the 200 grid")


if __name__ == "__main__":
    main()
