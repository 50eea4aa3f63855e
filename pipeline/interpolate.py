"""2 Hz keyframe annotations -> boxes at every 12 Hz reference frame (ASAP-style, paper Appendix C).

For a frame at time t between keyframes k and k+1 (sample timestamps, i.e. the time
the annotation describes) and an instance annotated at BOTH keyframes, the global
box is interpolated with alpha = (t - t_k) / (t_{k+1} - t_k): linear centre and size,
quaternion slerp for the rotation. An instance annotated on only one side is absent
(mask False). A keyframe frame takes its own annotations unchanged (alpha is not
used), so keyframes reproduce the annotations exactly. Visibility and num_lidar_pts
come from the nearer keyframe (so a filter can use them; they are not interpolated).
The result is expressed in each frame's LiDAR coordinates.

Everything is one vectorised pass over (frames x instances) arrays.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline import schema
from pipeline.geometry import invert_transform, quat_to_matrix, slerp, transform_boxes, wrap_angle, yaw_of_matrix


@dataclass
class KeyframeAnnotations:
    instance_tokens: list[str]     # (N,) scene-wide track order: first appearance, then token
    box_class: np.ndarray          # (N,) int8
    key_ts: np.ndarray             # (K,) int64 sample timestamps
    sample_tokens: list[str]       # (K,)
    present: np.ndarray            # (K, N) bool
    centre: np.ndarray             # (K, N, 3) float64 global
    size: np.ndarray               # (K, N, 3) float64 w, l, h
    quat: np.ndarray               # (K, N, 4) float64 (w, x, y, z) global
    visibility: np.ndarray         # (K, N) int8 (nuScenes visibility level 1-4, 0 = absent)
    num_lidar_pts: np.ndarray      # (K, N) int32
    records: list[dict]            # annotation records used (for the input hash)


@dataclass
class InterpolatedBoxes:
    boxes: np.ndarray              # (F, N, 7) float32 in each frame's LiDAR coords
    box_mask: np.ndarray           # (F, N) bool
    visibility: np.ndarray         # (F, N) int8
    num_lidar_pts: np.ndarray      # (F, N) int32
    global_boxes: np.ndarray       # (F, N, 7) float64, x y z w l h yaw in the global frame


def load_keyframe_annotations(nusc, sample_tokens: list[str]) -> KeyframeAnnotations:
    """Gather the annotations of the scene's keyframes (in time order) into dense (K, N) arrays."""
    samples = [nusc.get("sample", s) for s in sample_tokens]
    anns: list[list[dict]] = []
    first_seen: dict[str, tuple[int, str]] = {}
    classes: dict[str, int] = {}
    for k, s in enumerate(samples):
        rows = []
        for tok in s["anns"]:
            a = nusc.get("sample_annotation", tok)
            cat = nusc.get("category", nusc.get("instance", a["instance_token"])["category_token"])["name"]
            cls = schema.NUSCENES_CATEGORY_TO_CLASS.get(cat)
            if cls is None:  # categories outside the 10 detection classes are dropped
                continue
            rows.append(a)
            classes[a["instance_token"]] = schema.CLASS_ID[cls]
            first_seen.setdefault(a["instance_token"], (k, a["instance_token"]))
        anns.append(rows)
    order = sorted(first_seen, key=first_seen.__getitem__)
    col = {t: i for i, t in enumerate(order)}
    k_, n = len(samples), len(order)
    present = np.zeros((k_, n), bool)
    centre = np.zeros((k_, n, 3))
    size = np.ones((k_, n, 3))
    quat = np.zeros((k_, n, 4))
    quat[..., 0] = 1.0
    vis = np.zeros((k_, n), np.int8)
    nlp = np.zeros((k_, n), np.int32)
    records = []
    for k, rows in enumerate(anns):
        for a in rows:
            i = col[a["instance_token"]]
            present[k, i] = True
            centre[k, i] = a["translation"]
            size[k, i] = a["size"]
            quat[k, i] = a["rotation"]
            vis[k, i] = int(a["visibility_token"]) if str(a.get("visibility_token", "")).isdigit() else 0
            nlp[k, i] = int(a.get("num_lidar_pts", 0))
            records.append(a)
    return KeyframeAnnotations(
        instance_tokens=order, box_class=np.array([classes[t] for t in order], np.int8),
        key_ts=np.array([s["timestamp"] for s in samples], np.int64), sample_tokens=list(sample_tokens),
        present=present, centre=centre, size=size, quat=quat, visibility=vis, num_lidar_pts=nlp, records=records)


def interpolate_boxes(ann: KeyframeAnnotations, timestamps_us: np.ndarray, frame_sample_tokens: list[str],
                      lidar2global: np.ndarray) -> InterpolatedBoxes:
    """Boxes for F frames at ``timestamps_us`` (F,); ``frame_sample_tokens`` names the sample of keyframe
    frames ("" elsewhere); ``lidar2global`` (F, 4, 4)."""
    f, k = timestamps_us.shape[0], ann.key_ts.shape[0]
    n = len(ann.instance_tokens)
    if k == 0 or n == 0:
        z = np.zeros((f, n))
        return InterpolatedBoxes(np.zeros((f, n, 7), np.float32), z.astype(bool), z.astype(np.int8),
                                 z.astype(np.int32), np.zeros((f, n, 7)))
    ts = np.asarray(timestamps_us, np.int64)
    k0 = np.clip(np.searchsorted(ann.key_ts, ts, side="right") - 1, 0, max(k - 2, 0))  # (F,)
    k1 = np.minimum(k0 + 1, k - 1)
    span = np.maximum(ann.key_ts[k1] - ann.key_ts[k0], 1)
    alpha = np.clip((ts - ann.key_ts[k0]) / span, 0.0, 1.0)                           # (F,)
    key_of = {s: i for i, s in enumerate(ann.sample_tokens)}
    is_key = np.array([bool(s) and s in key_of for s in frame_sample_tokens])
    kk = np.array([key_of.get(s, 0) for s in frame_sample_tokens], np.int64)
    k0 = np.where(is_key, kk, k0)
    k1 = np.where(is_key, kk, k1)
    alpha = np.where(is_key, 0.0, alpha)

    a3 = alpha[:, None, None]
    centre = (1 - a3) * ann.centre[k0] + a3 * ann.centre[k1]                          # (F, N, 3)
    size = (1 - a3) * ann.size[k0] + a3 * ann.size[k1]                                # (F, N, 3)
    quat = np.where(is_key[:, None, None], ann.quat[k0],
                    slerp(ann.quat[k0], ann.quat[k1], np.broadcast_to(alpha[:, None], (f, n))))  # (F, N, 4)
    yaw = yaw_of_matrix(quat_to_matrix(quat))                                         # (F, N)
    mask = ann.present[k0] & ann.present[k1]                                          # (F, N)
    near = np.where(alpha[:, None] <= 0.5, k0[:, None], k1[:, None])                  # (F, 1)
    cols = np.arange(n)[None, :]
    global_boxes = np.concatenate([centre, size, yaw[..., None]], -1)                 # (F, N, 7)
    global2lidar = invert_transform(lidar2global)                                      # (F, 4, 4)
    boxes = transform_boxes(global2lidar[:, None], global_boxes)                      # (F, N, 7)
    boxes = np.where(mask[..., None], boxes, 0.0).astype(np.float32)
    return InterpolatedBoxes(
        boxes=boxes, box_mask=mask,
        visibility=np.where(mask, ann.visibility[near, cols], 0).astype(np.int8),
        num_lidar_pts=np.where(mask, ann.num_lidar_pts[near, cols], 0).astype(np.int32),
        global_boxes=global_boxes)


def errors_vs_truth(scene, truth) -> dict[str, np.ndarray]:
    """Compare a scene's interpolated boxes with per-frame truth (the synthetic dataset's synth_truth.parquet).

    ``scene``: SceneArrays with boxes; ``truth``: pyarrow table with scene_name, instance_token, channel,
    timestamp_us, x, y, z, yaw, present (global frame). Returns per matched (frame, instance) pair:
    centre_err (m), yaw_err (rad, wrapped), keyframe (bool), and per frame/instance ``truth_present`` (F, N)."""
    import pyarrow.compute as pc
    t = truth.filter(pc.and_(pc.equal(truth["scene_name"], scene.scene_name),
                             pc.equal(truth["channel"], schema.REFERENCE_VIEW)))
    col = {tok: i for i, tok in enumerate(scene.instance_tokens)}
    row = {int(ts): i for i, ts in enumerate(scene.timestamps_us)}
    inst = t["instance_token"].to_pylist()
    tss = t["timestamp_us"].to_pylist()
    keep = np.array([tok in col and ts in row for tok, ts in zip(inst, tss)], bool)
    fi = np.array([row.get(ts, -1) for ts in tss])[keep]
    ni = np.array([col.get(tok, -1) for tok in inst])[keep]
    f, n = scene.box_mask.shape
    present = np.zeros((f, n), bool)
    present[fi, ni] = np.asarray(t["present"].to_numpy(zero_copy_only=False), bool)[keep]
    g = np.zeros((f, n, 4))                                                     # x, y, z, yaw global truth
    for c, name in enumerate(("x", "y", "z", "yaw")):
        g[fi, ni, c] = np.asarray(t[name].to_numpy(zero_copy_only=False), np.float64)[keep]
    ours = transform_boxes(scene.lidar2global[:, None], scene.boxes.astype(np.float64))  # (F, N, 7) global
    both = scene.box_mask & present
    d_centre = np.linalg.norm(ours[..., :3] - g[..., :3], axis=-1)
    d_yaw = np.abs(wrap_angle(ours[..., 6] - g[..., 3]))
    kf = np.broadcast_to(scene.keyframe[:, None], (f, n))
    # an instance "moves" when its true centre travels more than 1 m while present
    xy = np.where(present[..., None], g[..., :2], np.nan)
    with np.errstate(invalid="ignore"):
        travel = np.nan_to_num(np.nanmax(xy, 0) - np.nanmin(xy, 0)).max(-1) if f else np.zeros(n)   # (N,)
    moving = np.broadcast_to((travel > 1.0)[None, :], (f, n))
    return {"centre_err": d_centre[both], "yaw_err": d_yaw[both], "keyframe": kf[both], "moving": moving[both],
            "truth_present": present}
