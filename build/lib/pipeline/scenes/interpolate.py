"""2 Hz keyframe annotations -> boxes at the exact exposure time each box is used for (one time model).

An annotation describes its sample's timestamp (the LiDAR sweep; in nuScenes CAM_FRONT fires
~35 ms earlier and the other cameras -8..+35 ms around it). Every box is interpolated at the
exposure it serves, keyframes included: for a time t between an instance's annotations at
samples k and k+1, alpha = (t - t_k) / (t_{k+1} - t_k), linear centre and size, quaternion
slerp for the rotation (ASAP-style, paper Appendix C), in the global frame.

Track ends (``EXTRAPOLATE_US``): up to one camera period before an instance's first or after
its last annotation (including before the scene's first sample), the box is extrapolated
along its nearest annotated segment (same alpha formula, alpha < 0 or > 1: constant
velocity and yaw rate); an instance annotated only once is held there. Farther away it is
absent (mask False). This keeps every instance annotated at a keyframe in that keyframe's
frames, whose exposures lie up to ~44 ms before the annotation. An instance annotated at k
but not at k+1 (or the reverse) is otherwise absent between them. Visibility and
num_lidar_pts come from the nearer annotation of the segment (they are not interpolated).

``interpolate_boxes`` gives the reference boxes at CAM_FRONT's exposure and, with
``view_timestamps_us``, the per-view boxes at each view's exposure, both in each frame's
LiDAR coordinates. Contract: where ``box_mask[t, n]`` holds, every view has a box for n
(``view_box_mask[t, :, n]``): a view's exposure may extend the extrapolation by up to
``VIEW_SPREAD_US`` for an object present at CAM_FRONT's time. Everything is one vectorised pass over (times x instances) arrays.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.contract import schema
from pipeline.contract.geometry import invert_transform, quat_to_matrix, slerp, transform_boxes, wrap_angle, yaw_of_matrix

EXTRAPOLATE_US = 83_334   # one 12 Hz camera period beyond a track's first/last annotation
VIEW_SPREAD_US = 50_000   # the rig's cameras fire within -8..+35 ms of CAM_FRONT: a view's extra reach


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
    boxes: np.ndarray              # (F, N, 7) float32 at CAM_FRONT's exposure, in each frame's LiDAR coords
    box_mask: np.ndarray           # (F, N) bool
    visibility: np.ndarray         # (F, N) int8
    num_lidar_pts: np.ndarray      # (F, N) int32
    global_boxes: np.ndarray       # (F, N, 7) float64, x y z w l h yaw in the global frame
    view_boxes: np.ndarray | None = None     # (F, V, N, 7) float32 at each view's exposure, in LiDAR(t)
    view_box_mask: np.ndarray | None = None  # (F, V, N) bool


@dataclass
class GlobalBoxes:
    boxes: np.ndarray              # (S, N, 7) float64 global x y z w l h yaw
    mask: np.ndarray               # (S, N) bool
    near: np.ndarray               # (S, N) int64 the nearer annotation of the segment used


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


def _segments(ann: KeyframeAnnotations, ts: np.ndarray, extrapolate_us):
    """Per (time, instance): annotation indices (a, b), alpha and presence under the time model above."""
    k, n = ann.key_ts.shape[0], ann.present.shape[1]
    cols = np.arange(n)[None, :]
    k0 = np.searchsorted(ann.key_ts, ts, side="right") - 1                          # (S,) -1..K-1
    k0c, k1c = np.clip(k0, 0, k - 1), np.clip(k0 + 1, 0, k - 1)
    p0 = ann.present[k0c] & (k0 >= 0)[:, None]                                     # (S, N)
    p1 = ann.present[k1c] & (k0 + 1 <= k - 1)[:, None]
    inner = p0 & p1
    after = p0 & ~p1 & ((ts - ann.key_ts[k0c]) <= extrapolate_us)[:, None]          # past the last annotation
    before = p1 & ~p0 & ((ann.key_ts[k1c] - ts) <= extrapolate_us)[:, None]         # ahead of the first one
    kk0 = np.broadcast_to(k0c[:, None], (len(ts), n))
    kk1 = np.broadcast_to(k1c[:, None], (len(ts), n))
    prev = np.clip(kk0 - 1, 0, k - 1)
    nxt = np.clip(kk1 + 1, 0, k - 1)
    has_prev = ann.present[prev, cols] & (kk0 >= 1)
    has_next = ann.present[nxt, cols] & (kk1 <= k - 2)
    a = np.where(inner, kk0, np.where(after, np.where(has_prev, prev, kk0), kk1))
    b = np.where(inner, kk1, np.where(after, kk0, np.where(has_next, nxt, kk1)))
    span = (ann.key_ts[b] - ann.key_ts[a]).astype(np.float64)
    alpha = np.where(a == b, 0.0, (ts[:, None] - ann.key_ts[a]) / np.where(span == 0, 1.0, span))
    return a, b, alpha, inner | after | before


def interpolate_global(ann: KeyframeAnnotations, times_us: np.ndarray,
                       extrapolate_us: int | np.ndarray = EXTRAPOLATE_US) -> GlobalBoxes:
    """Global boxes of every instance at the (S,) times ``times_us``; ``extrapolate_us`` a scalar or (S,)."""
    ts = np.asarray(times_us, np.int64).reshape(-1)
    n = len(ann.instance_tokens)
    if ann.key_ts.shape[0] == 0 or n == 0:
        return GlobalBoxes(np.zeros((len(ts), n, 7)), np.zeros((len(ts), n), bool), np.zeros((len(ts), n), np.int64))
    a, b, alpha, mask = _segments(ann, ts, extrapolate_us)                           # (S, N) each
    cols = np.arange(n)[None, :]
    a3 = alpha[..., None]
    centre = (1 - a3) * ann.centre[a, cols] + a3 * ann.centre[b, cols]             # (S, N, 3)
    size = (1 - a3) * ann.size[a, cols] + a3 * ann.size[b, cols]                   # (S, N, 3)
    yaw = yaw_of_matrix(quat_to_matrix(slerp(ann.quat[a, cols], ann.quat[b, cols], alpha)))   # (S, N)
    boxes = np.concatenate([centre, size, yaw[..., None]], -1)
    near = np.where(alpha <= 0.5, a, b)
    return GlobalBoxes(np.where(mask[..., None], boxes, 0.0), mask, near)


def to_lidar(global_boxes: np.ndarray, lidar2global: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(F, ..., N, 7) global boxes -> float32 in LiDAR(t) by (F, 4, 4) ``lidar2global``; zeros where masked."""
    g2l = invert_transform(lidar2global)                                           # (F, 4, 4)
    g2l = g2l.reshape(g2l.shape[:1] + (1,) * (global_boxes.ndim - 2) + (4, 4))
    boxes = transform_boxes(g2l, global_boxes)
    return np.where(mask[..., None], boxes, 0.0).astype(np.float32)


def interpolate_boxes(ann: KeyframeAnnotations, timestamps_us: np.ndarray, lidar2global: np.ndarray,
                      view_timestamps_us: np.ndarray | None = None,
                      extrapolate_us: int = EXTRAPOLATE_US) -> InterpolatedBoxes:
    """Reference boxes at the (F,) CAM_FRONT exposures ``timestamps_us`` in LiDAR(t) (``lidar2global`` (F, 4, 4));
    with ``view_timestamps_us`` (F, V) also each view's boxes at its own exposure, in the same LiDAR(t)."""
    f, n = len(timestamps_us), len(ann.instance_tokens)
    ref = interpolate_global(ann, timestamps_us, extrapolate_us)
    cols = np.arange(n)[None, :]
    vis = ann.visibility[ref.near, cols] if n and len(ann.key_ts) else np.zeros((f, n), np.int8)
    nlp = ann.num_lidar_pts[ref.near, cols] if n and len(ann.key_ts) else np.zeros((f, n), np.int32)
    out = InterpolatedBoxes(
        boxes=to_lidar(ref.boxes, lidar2global, ref.mask), box_mask=ref.mask,
        visibility=np.where(ref.mask, vis, 0).astype(np.int8),
        num_lidar_pts=np.where(ref.mask, nlp, 0).astype(np.int32), global_boxes=ref.boxes)
    if view_timestamps_us is not None:
        vt = np.asarray(view_timestamps_us, np.int64)                              # (F, V)
        own = interpolate_global(ann, vt, extrapolate_us).mask.reshape(vt.shape + (n,))
        # contract: an object present in the frame (box_mask) has a box in every view, so a view exposed up to
        # VIEW_SPREAD_US after/before CAM_FRONT may reach that much beyond the extrapolation limit (a repaired
        # view-frame, whose image is a neighbouring round's, as far as its exposure is from CAM_FRONT's)
        spread = np.maximum(VIEW_SPREAD_US, np.abs(vt - np.asarray(timestamps_us, np.int64)[:, None]))  # (F, V)
        per = interpolate_global(ann, vt, extrapolate_us + spread.reshape(-1))
        vb = per.boxes.reshape(vt.shape + (n, 7))                                  # (F, V, N, 7)
        vm = per.mask.reshape(vt.shape + (n,)) & (own | ref.mask[:, None])          # (F, V, N)
        out.view_boxes, out.view_box_mask = to_lidar(vb, lidar2global, vm), vm
    return out


def errors_vs_truth(scene, truth) -> dict[str, np.ndarray]:
    """Compare a scene's interpolated boxes with per-frame truth (the synthetic dataset's synth_truth.parquet).

    ``scene``: SceneArrays with boxes; ``truth``: pyarrow table with scene_name, instance_token, channel,
    timestamp_us, x, y, z, yaw, present (global frame). Returns per matched (frame, instance) pair:
    centre_err (m), yaw_err (rad, wrapped), keyframe (bool), moving (bool), travel (m, the instance's true
    extent of motion in the scene), and per frame/instance ``truth_present`` (F, N)."""
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
    travel = np.broadcast_to(travel[None, :], (f, n))
    return {"centre_err": d_centre[both], "yaw_err": d_yaw[both], "keyframe": kf[both], "moving": moving[both],
            "travel": travel[both], "truth_present": present}
