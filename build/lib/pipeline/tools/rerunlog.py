"""Clips as a Rerun recording (.rrd): the six cameras, the 3-D boxes, the BEV map and the ego path in one 3-D
scene on a 12 Hz timeline (``mdv2-inspect --rerun``, ``mdv2-sample --rerun``; open with ``rerun FILE.rrd``).

Two timelines: ``frame`` (the position on the scene's 12 Hz timeline, meta ``start_frame + t``) and ``time``
(microsecond timestamps: each view at its own exposure, meta ``view_timestamps_us``; frame t's ego pose,
reference boxes and map at the reference camera's). The world frame is LiDAR(0) of the first clip, z up.
Entities:

- ``world/ego`` LiDAR(t) (``traj[t]``), with ``world/ego/car`` (the ego's outline), ``world/ego/boxes`` (the
  reference boxes, 3-D, class colours of the PNG preview, labels 'class #track', class ids) and ``world/ego/bev`` (the BEV map as a textured ground plane);
- ``world/cams/<VIEW>`` camera v at its exposure (``traj[t] @ cam2lidar[t, v]``), ``.../image`` its pinhole
  (the stored K, H x W, x right y down z forward) and image, ``.../image/boxes`` the view's boxes projected
  (edges clipped at 0.1 m depth), ``.../boxes`` the view's own boxes as 3-D boxes in the camera frame;
- ``world/trajectory`` the ego path; ``bev`` the map as a 2-D image; ``caption`` the text condition.

A whole scene chains its clips: a clip that starts inside the previous one continues its pose exactly
(``traj`` of the shared frame); across a gap the previous clip's last step is repeated (constant velocity: a
viewer's approximation, said in ``notes``), since a sample carries no global pose.

rerun-sdk 0.23 is the last release beside numpy 1.26, and its datatype objects (rr.Quaternion, ...) call numpy
2's ``asarray(copy=)``: everything here is passed as plain arrays, which take another path.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.contract import cli, geometry, schema
from pipeline.tools.inspect import CLASS_RGB, _clipped_edges, map_layers

LIDAR_HEIGHT_M = 1.84   # LIDAR_TOP above the ground on the nuScenes car: the map plane when no box shows it
EGO_HALF_SIZE = (0.9, 2.3, 0.75)   # half width (x), length (y), height (z) of the ego's outline, metres


@dataclass
class Clip:
    """What the viewer draws of one clip; the array names and shapes are the sample contract's."""
    key: str
    views: list[str]
    frame_index: np.ndarray        # (T,) int, position on the scene's 12 Hz timeline
    times_us: np.ndarray           # (T,) int64, the reference camera's exposure
    view_times_us: np.ndarray      # (T, V) int64, each view's exposure
    boxes: np.ndarray              # (T, N, 7) LiDAR(t)
    view_boxes: np.ndarray         # (T, V, N, 7) LiDAR(t) at view v's exposure
    box_mask: np.ndarray           # (T, N) bool
    box_view_mask: np.ndarray      # (T, V, N) bool
    box_class: np.ndarray          # (N,) int
    box_track: np.ndarray | None   # (N,) int
    intrinsics: np.ndarray         # (V, 3, 3) at the stored H x W
    cam2lidar: np.ndarray          # (T, V, 4, 4)
    traj: np.ndarray               # (T, 4, 4) LiDAR(t) -> LiDAR(0)
    bev: np.ndarray | None         # (T, 8, G, G/8) uint8 packed
    bev_cells: int
    caption: str
    height: int
    width: int
    images: dict | None = None     # (t, v) -> (H, W, 3) uint8 RGB


def clip_of_sample(s: schema.Sample, images: dict | None = None) -> Clip:
    m = s.meta
    return Clip(s.key, list(m["views"]), m["start_frame"] + np.arange(s.num_frames),
                np.asarray(m["timestamps_us"], np.int64), np.asarray(m["view_timestamps_us"], np.int64),
                s.boxes, s.view_boxes, s.box_mask, s.box_view_mask, s.box_class, s.box_track, s.intrinsics,
                s.cam2lidar, s.traj, s.bev, int(m["bev"]["cells"]), s.caption, int(m["height"]), int(m["width"]),
                images)


def clip_of_generation(cond: dict, meta: dict, frames: np.ndarray) -> Clip:
    """The sampler's conditions (train.data.decode, fitted to the generated length) and its frames
    (V, T, H, W, 3) uint8. Timestamps are the source clip's where they exist; frames past its end (a longer
    generation) follow at 12 Hz with frame 0's view offsets."""
    v, t = frames.shape[:2]
    ts = np.asarray(meta["timestamps_us"], np.int64)
    vts = np.asarray(meta["view_timestamps_us"], np.int64)
    step = 1_000_000 // schema.FPS
    times = np.concatenate([ts[:t], ts[-1] + step * np.arange(1, t - len(ts) + 1)]) if t > len(ts) else ts[:t]
    view_times = times[:, None] + (vts[0] - ts[0])[None, :]
    view_times[:min(t, len(ts))] = vts[:t]
    images = {(ti, vi): np.ascontiguousarray(frames[vi, ti]) for ti in range(t) for vi in range(v)}
    n = len(cond["box_class"])
    return Clip(f"{cond['key']} (generated)", list(cond["views"]), meta["start_frame"] + np.arange(t), times,
                view_times, cond["boxes"], cond["view_boxes"], cond["box_mask"], cond["box_view_mask"],
                cond["box_class"], cond.get("box_track", np.arange(n)), cond["intrinsics"], cond["cam2lidar"],
                cond["traj"], cond.get("bev"), int(meta["bev"]["cells"]), cond["caption"], frames.shape[2],
                frames.shape[3], images)


# ---- poses ----------------------------------------------------------------------------------------

def chain_poses(clips: list[Clip]) -> tuple[list[np.ndarray], list[str]]:
    """world <- LiDAR(0) of each clip (clips sorted by their first frame), and notes on approximations."""
    poses, notes = [np.eye(4)], []
    for prev, cur, w_prev in zip(clips, clips[1:], poses):
        k = int(cur.frame_index[0] - prev.frame_index[0])
        if 0 <= k < len(prev.traj):
            poses.append(w_prev @ prev.traj[k].astype(np.float64))
            continue
        last = len(prev.traj) - 1
        step = (geometry.invert_transform(prev.traj[last - 1].astype(np.float64)) @ prev.traj[last]
                if last else np.eye(4))
        gap = k - last
        poses.append(w_prev @ prev.traj[last].astype(np.float64) @ np.linalg.matrix_power(step, max(gap, 0)))
        notes.append(f"{cur.key}: {gap} frames after {prev.key}; placed at constant velocity (no shared frame)")
    return poses, notes


def _quat_xyzw(r: np.ndarray) -> np.ndarray:
    """(..., 3, 3) -> (..., 4) x y z w (Rerun's order; geometry uses w x y z)."""
    q = geometry.matrix_to_quat(r)
    return np.concatenate([q[..., 1:], q[..., :1]], -1).astype(np.float32)


def _rz(yaw: np.ndarray) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    r = np.zeros(np.shape(yaw) + (3, 3))
    r[..., 0, 0], r[..., 0, 1], r[..., 1, 0], r[..., 1, 1], r[..., 2, 2] = c, -s, s, c, 1
    return r


def boxes3d(rr, boxes: np.ndarray, classes: np.ndarray, tracks: np.ndarray | None, frame: np.ndarray | None = None):
    """rr.Boxes3D of (n, 7) LiDAR boxes, optionally moved into another frame by the 4 x 4 ``frame``."""
    centres = boxes[:, :3].astype(np.float64)
    rot = _rz(boxes[:, 6].astype(np.float64))                           # (n, 3, 3), box +x = heading
    if frame is not None:
        centres = geometry.transform_points(frame, centres)
        rot = frame[:3, :3] @ rot
    half = np.stack([boxes[:, 4], boxes[:, 3], boxes[:, 5]], -1) / 2     # l along x, w along y, h along z
    labels = [f"{schema.OBJECT_CLASSES[int(c)]} #{int(tr)}" if tracks is not None else schema.OBJECT_CLASSES[int(c)]
              for c, tr in zip(classes, tracks if tracks is not None else classes)]
    return rr.Boxes3D(centers=centres.astype(np.float32), half_sizes=half.astype(np.float32),
                      quaternions=_quat_xyzw(rot), class_ids=np.asarray(classes, np.uint16), labels=labels,
                      colors=_colours(classes))


def _colours(classes: np.ndarray) -> np.ndarray:
    """(n, 3) uint8 class colours (an AnnotationContext would carry them, but rerun 0.23 cannot build one
    beside numpy 1.26: explicit colours per item instead)."""
    return np.asarray([CLASS_RGB[int(c) % len(CLASS_RGB)] for c in classes], np.uint8).reshape(-1, 3)


def _ground_z(clip: Clip) -> float:
    present = clip.boxes[clip.box_mask]
    return float(np.median(present[:, 2] - present[:, 5] / 2)) if len(present) else -LIDAR_HEIGHT_M


# ---- logging --------------------------------------------------------------------------------------

def _set_time(rec, frame: int, us: int) -> None:
    rec.set_time("frame", sequence=int(frame))
    rec.set_time("time", timestamp=np.datetime64(int(us), "us"))


def _log_frame(rr, rec, clip: Clip, t: int, world: np.ndarray, z: float) -> None:
    _set_time(rec, clip.frame_index[t], clip.times_us[t])
    ego = world @ clip.traj[t].astype(np.float64)
    rec.log("world/ego", rr.Transform3D(translation=ego[:3, 3].astype(np.float32),
                                        mat3x3=ego[:3, :3].astype(np.float32)))
    present = np.flatnonzero(clip.box_mask[t])
    rec.log("world/ego/boxes", boxes3d(rr, clip.boxes[t, present], clip.box_class[present],
                                       None if clip.box_track is None else clip.box_track[present]))
    if clip.bev is not None:
        img = map_layers(clip.bev[t], clip.bev_cells)                   # (G, G, 3), row 0 ahead
        e = schema.BEV_EXTENT_M / 2
        rec.log("world/ego/bev", rr.Mesh3D(
            vertex_positions=np.array([[-e, e, z], [e, e, z], [e, -e, z], [-e, -e, z]], np.float32),
            triangle_indices=np.array([[0, 1, 2], [0, 2, 3]], np.uint32),
            vertex_texcoords=np.array([[0, 0], [1, 0], [1, 1], [0, 1]], np.float32), albedo_texture=img))
        rec.log("bev", rr.Image(img))


def _log_view(rr, rec, clip: Clip, t: int, v: int, world: np.ndarray) -> None:
    name = clip.views[v]
    _set_time(rec, clip.frame_index[t], clip.view_times_us[t, v])
    cam = world @ clip.traj[t].astype(np.float64) @ clip.cam2lidar[t, v].astype(np.float64)
    rec.log(f"world/cams/{name}", rr.Transform3D(translation=cam[:3, 3].astype(np.float32),
                                                 mat3x3=cam[:3, :3].astype(np.float32)))
    rec.log(f"world/cams/{name}/image", rr.Pinhole(image_from_camera=np.asarray(clip.intrinsics[v], np.float32),
                                                   resolution=[clip.width, clip.height],
                                                   camera_xyz=rr.ViewCoordinates.RDF))
    if clip.images is not None and (t, v) in clip.images:
        rec.log(f"world/cams/{name}/image", rr.Image(clip.images[(t, v)]))
    present = np.flatnonzero(clip.box_mask[t])
    lidar2cam = geometry.invert_transform(clip.cam2lidar[t, v].astype(np.float64))
    rec.log(f"world/cams/{name}/boxes", boxes3d(rr, clip.view_boxes[t, v, present], clip.box_class[present],
                                                None if clip.box_track is None else clip.box_track[present],
                                                lidar2cam))
    strips, ids = [], []
    for n in present:
        for p, q in _clipped_edges(clip, t, v, int(n)):
            strips.append(np.stack([p, q]).astype(np.float32))
            ids.append(int(clip.box_class[n]))
    rec.log(f"world/cams/{name}/image/boxes", rr.LineStrips2D(strips, class_ids=np.asarray(ids, np.uint16),
                                                              colors=_colours(np.asarray(ids))))


def require_rerun():
    """The rerun module, or the user's error of a missing viewer extra (checked before any long work)."""
    try:
        import rerun
    except ImportError:
        raise cli.BadInput("--rerun needs rerun-sdk: pip install -e '.[viewer]' (docs/dataset.md)") from None
    return rerun


def write_recording(path: str, clips: list[Clip], app_id: str = "mdv2") -> list[str]:
    """Log the clips (one scene: sorted and chained) into a new .rrd at ``path``; returns the notes."""
    rr = require_rerun()
    if not clips:
        raise cli.BadInput("nothing to log: no clips")
    clips = sorted(clips, key=lambda c: int(c.frame_index[0]))
    poses, notes = chain_poses(clips)
    rec = rr.RecordingStream(app_id)
    rec.save(path)
    rec.log("world", rr.ViewCoordinates.RIGHT_HAND_Z_UP, static=True)
    path_xyz = np.concatenate([np.stack([(w @ tr.astype(np.float64))[:3, 3] for tr in c.traj])
                               for c, w in zip(clips, poses)]).astype(np.float32)
    rec.log("world/trajectory", rr.LineStrips3D([path_xyz]), static=True)
    if notes:
        rec.log("notes", rr.TextDocument("\n".join(notes)), static=True)
    for clip, world in zip(clips, poses):
        z = _ground_z(clip)
        rec.log("world/ego/car", rr.Boxes3D(centers=np.array([[0, 0, z + EGO_HALF_SIZE[2]]], np.float32),
                                            half_sizes=np.array([EGO_HALF_SIZE], np.float32)), static=True)
        for t in range(len(clip.traj)):
            _log_frame(rr, rec, clip, t, world, z)
            if t == 0:
                rec.log("caption", rr.TextDocument(f"{clip.key}\n\n{clip.caption}"))
            for v in range(len(clip.views)):
                _log_view(rr, rec, clip, t, v, world)
    rec.flush()
    return notes


def inspect_recording(path: str, shard: str, key: str | None, scene: str | None, dataroot: str | None,
                      vae: str | None) -> tuple[list[str], list[str]]:
    """mdv2-inspect --rerun: one sample of the shard (``key`` or the first), or every sample of ``scene`` in the
    shard's bucket folder; views from the source frames, the decoded latents or false colour
    (inspect.view_images). Returns (keys logged, notes)."""
    from pipeline.contract import storage
    from pipeline.contract.shardio import iter_shard
    from pipeline.tools.inspect import load_sample, view_images
    require_rerun()
    if scene is None:
        samples = [load_sample(shard, key)]
    else:
        folder = shard.rsplit("/", 1)[0] if "/" in shard else "."
        samples = [schema.decode_sample(m, key=k) for uri in sorted(storage.glob(storage.join(folder, "shard-*.tar")))
                   for k, m in iter_shard(storage.read_bytes(uri)) if json_scene(m) == scene]
        if not samples:
            raise cli.UnknownName(f"no sample of scene {scene!r} in {folder}/shard-*.tar")
    clips = [clip_of_sample(s, view_images(s, list(range(s.num_frames)), dataroot, vae)[0]) for s in samples]
    return [c.key for c in clips], write_recording(path, clips)


def json_scene(members: dict) -> str | None:
    import json
    return json.loads(members["meta.json"]).get("scene_name") if "meta.json" in members else None


def write_generated(path: str, cond: dict, meta: dict, frames: np.ndarray) -> list[str]:
    """mdv2-sample --rerun: the generated views (V, T, H, W, 3) with the boxes, cameras, map and path they were
    conditioned on."""
    return write_recording(path, [clip_of_generation(cond, meta, frames)])
