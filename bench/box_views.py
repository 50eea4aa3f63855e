"""What `boxes_per_view` changes in the box encoder's inputs, on the synthetic truth (issue 21 item 1).

The authors' network takes boxes per view (folded into the batch) but their data repeats the reference
boxes (one time for all six cameras); `ModelConfig.boxes_per_view` feeds each view its own `view_boxes` at
its own exposure instead (same weights). Both inputs of the box encoder are measured, as model/native.py
`box_inputs` makes them from one clip's shard members (the whole 20 s scene as one clip, at 1600 x 900):
  corners: the centroid of each box's 8 corners projected through that view's cam2lidar + K, vs where the
           synthetic renderer drew the object (its truth at that camera's own timestamp through the true
           pose; pipeline/tools/boxcheck.py), px at 1600 px width, median / p95 / max;
           `box_corners: true` isolates the timing; the authors' corners (centre read as the bottom centre,
           the default) add their h/2 lift, reported too;
  masks:   the per-view mask (1 = some real corner in front of the camera): the share of (frame, view, box)
           entries that differ between the two inputs, and each one's recall of the objects the renderer
           drew inside that image.
The baseline of the same run is the repeated reference boxes (`boxes_per_view: false`).

    python bench/box_views.py [--keep DIR]
"""
from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import replace

os.environ.setdefault("OMP_NUM_THREADS", "1")
from _common import save, synthetic_scene  # noqa: E402

import numpy as np  # noqa: E402

WIDTH, HEIGHT = 1600, 900


def encoder_inputs(g: dict, boxes_per_view: bool, box_corners: str) -> tuple[np.ndarray, np.ndarray]:
    """model/native.box_inputs on one clip -> corner centroids (T, V, N, 3) in LiDAR(t), masks (T, V, N) bool."""
    import torch
    from model.conditions import Conditions
    from model.config import ModelConfig
    from model.native import box_inputs
    T, V, N = g["view_boxes"].shape[:3]
    t = {k: torch.from_numpy(np.asarray(g[k]))[None] for k in ("boxes", "view_boxes", "box_mask", "box_view_mask",
                                                                "cam2lidar", "intrinsics", "traj")}
    cond = Conditions(text=torch.zeros(1, 1, 1), text_mask=torch.ones(1, 1, dtype=torch.bool),
                      intrinsics=t["intrinsics"], cam2lidar=t["cam2lidar"], boxes=t["boxes"],
                      view_boxes=t["view_boxes"], box_class=torch.from_numpy(g["box_class"].astype(np.int64))[None],
                      box_mask=t["box_mask"], box_view_mask=t["box_view_mask"], traj=t["traj"],
                      bev=torch.zeros(1, T, 8, 1, 1))
    cfg = replace(ModelConfig(), boxes_per_view=boxes_per_view, box_corners=box_corners)
    b = box_inputs(cfg, cond)                                            # (V, T, N, 8, 3), (V, T, N) (B = 1)
    centre = b["bboxes"].double().mean(-2).transpose(0, 1).numpy()      # (T, V, N, 3)
    return centre, b["masks"].transpose(0, 1).numpy() > 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", default=None, help="write/reuse the synthetic dataset here")
    a = p.parse_args()
    import pyarrow.parquet as pq
    from pipeline.scenes.scenestore import build_scene_store, open_scene_store
    from pipeline.shards.clips import clip_geometry
    from pipeline.tools.boxcheck import projection_errors, summary, truth_at_views

    root, nusc, name, nusc_map = synthetic_scene(a.keep, "bench_boxviews_", seed=1)
    uri = build_scene_store(root, "v1.0-synth", name, tempfile.mkdtemp(prefix="bench_boxviews_out_"), nusc=nusc,
                            nusc_map=nusc_map, force=True)
    sa = open_scene_store(uri)
    f = sa.num_frames
    g = clip_geometry(sa, 0, f, HEIGHT, WIDTH)
    present = np.asarray(sa.box_mask).any(0) | np.asarray(sa.view_box_mask).any((0, 1))
    tokens = np.asarray(sa.instance_tokens)[np.flatnonzero(present)]   # the clip's objects, clip_geometry's order
    truth = truth_at_views(pq.read_table(os.path.join(root, "synth_truth.parquet")), sa.scene_name, tokens,
                           list(sa.views), np.asarray(sa.view_timestamps_us))
    views = list(sa.views)
    c, seen = truth["centre"], truth["present"]                          # (T, V, N, 3) global, (T, V, N)
    lo = np.where(seen[..., None], c, np.inf).min((0, 1))
    hi = np.where(seen[..., None], c, -np.inf).max((0, 1))
    moving = np.linalg.norm(hi - lo, axis=-1) > 1.0                      # (N,) objects that travel > 1 m

    figures: dict = {"frames": f, "objects": len(tokens), "moving_objects": int(moving.sum())}
    masks = {}
    for tag, per_view in (("repeated", False), ("per_view", True)):
        for corners in ("true", "authors"):
            centre, mask = encoder_inputs(g, per_view, corners)
            vb = np.concatenate([centre, np.zeros(centre.shape[:-1] + (4,))], -1)
            err = projection_errors(vb, mask, g["cam2lidar"], g["intrinsics"], WIDTH, HEIGHT, truth)
            figures[f"{tag}_{corners}_corners_px"] = summary(err, views)
            figures[f"{tag}_{corners}_corners_moving_px"] = summary(
                projection_errors(vb, mask & moving, g["cam2lidar"], g["intrinsics"], WIDTH, HEIGHT, truth), views)
            masks[tag] = mask
        drawn = len(err["err_px"]) + len(err["missing_frame"])
        figures[f"{tag}_mask_recall"] = len(err["err_px"]) / max(drawn, 1)
        figures[f"{tag}_mask_on"] = int(masks[tag].sum())
    figures["mask_differs"] = float((masks["repeated"] != masks["per_view"]).mean())
    figures["mask_differs_where_on"] = float((masks["repeated"] != masks["per_view"]).sum()
                                             / max((masks["repeated"] | masks["per_view"]).sum(), 1))
    r, v = figures["repeated_true_corners_px"]["all"], figures["per_view_true_corners_px"]["all"]
    ra, va = figures["repeated_authors_corners_px"]["all"], figures["per_view_authors_corners_px"]["all"]
    rm, vm = figures["repeated_true_corners_moving_px"]["all"], figures["per_view_true_corners_moving_px"]["all"]
    def px(d: dict, digits: int = 2) -> str:
        return "/".join(f"{d[k]:.{digits}f}" for k in ("median", "p95", "max"))
    summary_line = (f"{f} frames, {len(tokens)} objects ({int(moving.sum())} moving), px@1600 median/p95/max of "
                    f"the box encoder's corners (true corners): repeated reference boxes {px(r)} -> boxes_per_view "
                    f"{px(v)} (p95 {r['p95'] / v['p95']:.0f}x), moving objects {px(rm)} -> {px(vm)}; the authors' "
                    f"lifted corners {px(ra, 1)} -> {px(va, 1)}; masks differ on "
                    f"{100 * figures['mask_differs_where_on']:.2f} % of the entries on in either, recall of drawn "
                    f"objects {figures['repeated_mask_recall']:.4f} -> {figures['per_view_mask_recall']:.4f}")
    save("box_views", figures, summary_line)


if __name__ == "__main__":
    main()
