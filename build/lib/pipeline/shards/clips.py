"""Assemble one contract sample (pipeline/contract/schema.py) from a scene store frame range.

Everything but the latents and the caption comes from the per-scene store (SceneArrays,
pipeline/scenes/scenestore.py): reference boxes (CAM_FRONT's exposure), per-view boxes (each view's
exposure) and per-frame extrinsics sliced to the clip's frames, the objects present in some
view somewhere in the clip kept (in store order, so ``box_track`` — the scene-level instance
index — is stable across frames and across clips), the trajectory re-based on the first
frame, intrinsics moved to the stored resolution (the source K kept as ``source_intrinsics``), the view
masks recomputed there, the BEV maps at the bucket's grid (``schema.bev_grid``), and the fill mask:
the view-frames whose image is a repaired drop (the store's ``fill_from`` names another round).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.contract import geometry, schema


def _local(sa, start: int, num_frames: int) -> np.ndarray:
    """Indices into the loaded arrays (a store opened with ``frames=slice`` starts at ``sa.frame_start``)."""
    idx = np.arange(start, start + num_frames) - int(getattr(sa, "frame_start", 0))
    if idx[0] < 0 or idx[-1] >= len(sa.timestamps_us):
        raise IndexError(f"{sa.scene_name}: frames {start}..{start + num_frames - 1} are outside the loaded "
                         f"range of {len(sa.timestamps_us)} frames from {getattr(sa, 'frame_start', 0)}")
    return idx


def fill_mask(sa, start: int, num_frames: int) -> np.ndarray:
    """(T, V) bool: view v's image at frame t comes from another round (a repaired drop)."""
    idx = _local(sa, start, num_frames)
    return np.asarray(sa.fill_from)[idx] != np.arange(start, start + num_frames)[:, None]


def clip_geometry(sa, start: int, num_frames: int, height: int, width: int) -> dict[str, np.ndarray]:
    """The array members of a clip except the latents: boxes, masks, class/track, K, extrinsics, traj, BEV,
    fill mask."""
    idx = _local(sa, start, num_frames)
    present = np.asarray(sa.box_mask)[idx]                          # (T, N_scene) at CAM_FRONT's exposure
    view_present = np.asarray(sa.view_box_mask)[idx]                # (T, V, N_scene) at each view's exposure
    sel = np.flatnonzero(present.any(0) | view_present.any((0, 1)))  # objects seen in the clip
    box_mask = present[:, sel]                                      # (T, N)
    boxes = np.asarray(sa.boxes)[idx][:, sel].astype(np.float32)    # (T, N, 7) LiDAR(t)
    boxes[~box_mask] = 0.0                                          # padding where absent
    view_mask = view_present[:, :, sel]                             # (T, V, N)
    view_boxes = np.asarray(sa.view_boxes)[idx][:, :, sel].astype(np.float32)   # (T, V, N, 7) LiDAR(t)
    view_boxes[~view_mask] = 0.0
    intrinsics = geometry.resize_crop_intrinsics(np.asarray(sa.intrinsics), tuple(sa.image_size), width, height)
    cam2lidar = np.asarray(sa.cam2lidar, np.float64)[idx]           # (T, V, 4, 4) camera v at its exposure
    view = geometry.view_box_visibility(view_boxes, intrinsics, cam2lidar, width, height) & view_mask  # (T, V, N)
    l2g = np.asarray(sa.lidar2global, np.float64)[idx]             # (T, 4, 4)
    traj = geometry.invert_transform(l2g[0])[None] @ l2g             # LiDAR(t) -> LiDAR(0)
    return {
        "boxes": boxes, "view_boxes": view_boxes, "box_mask": box_mask, "box_view_mask": view,
        "box_class": np.asarray(sa.box_class)[sel].astype(np.int8),
        "box_track": np.asarray(sa.box_track)[sel].astype(np.int32),
        "intrinsics": intrinsics.astype(np.float32), "source_intrinsics": np.asarray(sa.intrinsics, np.float32),
        "cam2lidar": cam2lidar.astype(np.float32), "fill_mask": fill_mask(sa, start, num_frames),
        "traj": traj.astype(np.float32), "bev": np.asarray(sa.bev[schema.bev_grid(height)[0]])[idx].astype(np.uint8),
    }


def clip_meta(sa, start: int, num_frames: int, height: int, width: int, vae: dict, latent: str,
              caption_meta: dict, split: str | None = None) -> dict[str, Any]:
    idx = _local(sa, start, num_frames)
    return {
        "schema_version": schema.SCHEMA_VERSION, "pipeline_version": schema.PIPELINE_VERSION,
        "dataset": str(sa.dataset), "split": str(split or sa.split), "scene_token": str(sa.scene_token),
        "scene_name": str(sa.scene_name), "start_frame": int(start), "num_frames": int(num_frames),
        "fps": schema.FPS, "height": int(height), "width": int(width), "views": [str(v) for v in sa.views],
        "timestamps_us": [int(t) for t in np.asarray(sa.timestamps_us)[idx]],
        "view_timestamps_us": [[int(t) for t in row] for row in np.asarray(sa.view_timestamps_us)[idx]],
        "keyframes": [bool(k) for k in np.asarray(sa.keyframe)[idx]],
        "frames": [[str(p) for p in row] for row in np.asarray(sa.frame_paths)[idx]],
        "filled": np.argwhere(fill_mask(sa, start, num_frames)).tolist(),
        "bev": dict(zip(("cells", "cell_m"), schema.bev_grid(height))),
        "source_size": [[int(w), int(h)] for w, h in np.asarray(sa.source_sizes)],
        "vae": dict(vae), "latent": latent,
        "caption": {k: caption_meta.get(k) for k in schema.CAPTION_META_FIELDS},
    }


def assemble_sample(sa, start: int, num_frames: int, height: int, width: int, latent_mean: np.ndarray,
                    latent_std: np.ndarray | None, caption: str, caption_meta: dict, vae: dict,
                    split: str | None = None) -> dict[str, Any]:
    """A sample dict ready for schema.encode_sample (which validates it)."""
    key = schema.sample_key(str(sa.scene_name), start, num_frames, height, width)
    meta = clip_meta(sa, start, num_frames, height, width, vae, "mean" if latent_std is None else "mean+std",
                     caption_meta, split)
    d = {"key": key, "meta": meta, "caption": caption, "latent_mean": latent_mean, "latent_std": latent_std}
    d.update(clip_geometry(sa, start, num_frames, height, width))
    return d
