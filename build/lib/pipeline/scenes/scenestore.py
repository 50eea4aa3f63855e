"""Per-scene zarr v3 store of the dense 12 Hz arrays (DESIGN.md §2), one per scene.

Layout under ``{out}/`` + ``schema.scene_store_path(name)``: one array per field of
``SceneArrays``, frame-indexed arrays chunked by ``FRAME_CHUNK`` frames and zstd
compressed; scene facts, the timeline problems and ``inputs_hash`` live in the group
attributes. ``complete`` is set last, so a store cut short by a crash is rebuilt.
A store whose ``inputs_hash`` (the scene's source records, the map file, the
settings, the pipeline version and STORE_VERSION) is unchanged is not recomputed.

Time model (pipeline/scenes/interpolate.py): ``boxes`` at CAM_FRONT's exposure, ``view_boxes`` at
each view's own exposure (``view_timestamps_us``), both in LiDAR(t) = the LiDAR at CAM_FRONT's
ego pose (``lidar2global``); ``cam2lidar[t, v]`` goes from camera v at its exposure through its
own ego pose to LiDAR(t). Stores of an older STORE_VERSION hash differently and are recomputed
("1": boxes = annotations at keyframes, static extrinsics; "2": one 200-cell BEV grid, no fill arrays).

Dropped frames (pipeline/scenes/nuscenes.py): ``frame_paths[t, v]`` is the image used for view v at
round t, ``fill_from[t, v]`` the round it was recorded in (t itself unless repaired; -1: no image of that
camera at all), and ``view_timestamps_us``, ``cam2lidar`` and ``view_boxes`` describe that image at its
own exposure. ``gap[t]`` marks a hole in the trigger rounds before frame t (no camera recorded a round
there): no clip spans it. BEV maps: one array per grid of ``schema.BEV_GRIDS`` (``bev_200``,
``bev_400``), read into ``SceneArrays.bev`` as {cells: (F, 8, G, G/8)}.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from pipeline.contract import schema, storage
from pipeline.scenes.bevmap import BevConfig, bev_grids_packed
from pipeline.scenes.interpolate import interpolate_boxes, load_keyframe_annotations
from pipeline.scenes.nuscenes import DEFAULT_TOLERANCE_S, build_timeline, load_map, load_nuscenes, scene_split

STORE_VERSION = "3"   # 2: exposure-time boxes, per-view boxes, per-frame extrinsics; 3: BEV grids, fills
FRAME_CHUNK = 24   # 2 s at 12 Hz: a 17-frame clip touches at most 2 chunks
BEV_FIELDS = tuple(f"bev_{cells}" for cells, _ in schema.BEV_GRIDS)
HEAVY = ("boxes", "box_mask", "view_boxes", "view_box_mask", "visibility", "num_lidar_pts") + BEV_FIELDS
FRAME_FIELDS = ("timestamps_us", "view_timestamps_us", "keyframe", "frame_paths", "frame_ok", "fill_from", "gap",
                "lidar2global", "cam2lidar") + HEAVY


@dataclass
class SceneArrays:
    scene_name: str
    scene_token: str
    split: str
    dataset: str                       # nuScenes version, e.g. v1.0-trainval
    description: str
    map_name: str
    views: list[str]
    image_size: tuple[int, int]        # (W, H) of the source images
    timestamps_us: np.ndarray          # (F,) int64, CAM_FRONT
    keyframe: np.ndarray               # (F,) bool
    frame_paths: np.ndarray            # (F, V) str, relative to the dataroot
    frame_ok: np.ndarray               # (F, V) bool, the round's own image was recorded (False: repaired or lost)
    fill_from: np.ndarray              # (F, V) int32 round whose image frame_paths names (-1: none)
    gap: np.ndarray                    # (F,) bool, a hole in the trigger rounds before this frame
    lidar2global: np.ndarray           # (F, 4, 4) float64
    intrinsics: np.ndarray             # (V, 3, 3) float32, source resolution
    source_sizes: np.ndarray           # (V, 2) int, each camera's (W, H)
    cam2lidar: np.ndarray              # (F, V, 4, 4) float32, camera v at its exposure -> LiDAR(t)
    view_timestamps_us: np.ndarray     # (F, V) int64, each view's exposure
    box_class: np.ndarray              # (N,) int8
    box_track: np.ndarray              # (N,) int32
    instance_tokens: np.ndarray        # (N,) str
    boxes: np.ndarray | None = None          # (F, N, 7) float32 at CAM_FRONT's exposure, LiDAR(t)
    box_mask: np.ndarray | None = None       # (F, N) bool
    view_boxes: np.ndarray | None = None     # (F, V, N, 7) float32 at each view's exposure, LiDAR(t)
    view_box_mask: np.ndarray | None = None  # (F, V, N) bool
    visibility: np.ndarray | None = None     # (F, N) int8
    num_lidar_pts: np.ndarray | None = None  # (F, N) int32
    bev: dict | None = None                  # {G: (F, 8, G, G/8) uint8 packed} per grid of schema.BEV_GRIDS
    frame_start: int = 0               # index of the first loaded frame in the scene
    num_scene_frames: int = 0          # F of the whole scene
    problems: list[dict] = field(default_factory=list)  # timeline problems: frame, view, reason, detail
    uri: str = ""

    @property
    def num_frames(self) -> int:
        return int(self.timestamps_us.shape[0])


_MAP_DIGESTS: dict[tuple, str] = {}


def _file_digest(path: str) -> str:
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _MAP_DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _MAP_DIGESTS[key] = h.hexdigest()
    return _MAP_DIGESTS[key]


def inputs_hash(timeline, ann, map_path: str, settings: dict) -> str:
    h = hashlib.sha256()
    for part in (timeline.records, ann.records, settings,
                 {"store": STORE_VERSION, "pipeline": schema.PIPELINE_VERSION, "map": _file_digest(map_path)}):
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(timeline.lidar2global).tobytes())
    h.update(np.ascontiguousarray(timeline.view_ego2global).tobytes())
    return h.hexdigest()


def store_uri(out: str, scene_name: str) -> str:
    return storage.join(out, schema.scene_store_path(scene_name))


def _open(uri: str, mode: str):
    try:
        return zarr.open_group(uri, mode=mode)
    except FileNotFoundError:
        return None
    except Exception as e:  # zarr raises its own errors for missing/corrupt groups
        if mode == "r":
            return None
        raise OSError(f"cannot open scene store {uri}: {e}") from e


def is_complete(uri: str, digest: str | None = None) -> bool:
    if not storage.exists(uri):
        return False
    g = _open(uri, "r")
    if g is None or not g.attrs.get("complete"):
        return False
    return digest is None or g.attrs.get("inputs_hash") == digest


def _put(g, name: str, arr: np.ndarray, frame_axis: bool) -> None:
    arr = np.asarray(arr)
    chunks = tuple(max(1, min(FRAME_CHUNK, s)) if (i == 0 and frame_axis) else max(1, s)
                   for i, s in enumerate(arr.shape))
    if arr.dtype.kind in "OU":
        a = g.create_array(name, shape=arr.shape, chunks=chunks, dtype=str)
        a[...] = arr.astype(object)
    else:
        a = g.create_array(name, shape=arr.shape, chunks=chunks, dtype=arr.dtype, compressors=ZstdCodec(level=3))
        a[...] = arr


def build_scene_store(dataroot: str, version: str, scene_name: str, out: str, *, nusc=None, nusc_map=None,
                      force: bool = False, tolerance_s: float = DEFAULT_TOLERANCE_S,
                      bev: BevConfig = BevConfig()) -> str:
    """Timeline + interpolated boxes + BEV maps of one scene -> zarr store; returns its URI."""
    return build_scene_store_status(dataroot, version, scene_name, out, nusc=nusc, nusc_map=nusc_map, force=force,
                                    tolerance_s=tolerance_s, bev=bev)[0]


def build_scene_store_status(dataroot: str, version: str, scene_name: str, out: str, *, nusc=None, nusc_map=None,
                             force: bool = False, tolerance_s: float = DEFAULT_TOLERANCE_S,
                             bev: BevConfig = BevConfig()) -> tuple[str, bool]:
    """As build_scene_store, plus whether the store was (re)computed (False = up to date, skipped)."""
    nusc = nusc or load_nuscenes(dataroot, version)
    uri = store_uri(out, scene_name)
    tl = build_timeline(nusc, scene_name, tolerance_s=tolerance_s)
    ann = load_keyframe_annotations(nusc, [s for s in tl.sample_tokens if s])
    map_path = os.path.join(nusc.dataroot, "maps", "expansion", f"{tl.map_name}.json")
    if not os.path.exists(map_path):
        raise FileNotFoundError(f"scene {scene_name}: map expansion {map_path} is missing")
    digest = inputs_hash(tl, ann, map_path, {"tolerance_s": tolerance_s, "bev": asdict(bev),
                                             "version": version})
    if not force and is_complete(uri, digest):
        return uri, False
    nusc_map = nusc_map if nusc_map is not None and nusc_map.map_name == tl.map_name \
        else load_map(nusc.dataroot, tl.map_name)
    ib = interpolate_boxes(ann, tl.timestamps_us, tl.lidar2global, tl.view_timestamps_us)
    bev_packed = bev_grids_packed(nusc_map, tl.lidar2global, bev)                # {G: (F, 8, G, G/8)}

    g = zarr.open_group(uri, mode="w")
    frame_arrays = {
        "timestamps_us": tl.timestamps_us.astype(np.int64), "view_timestamps_us": tl.view_timestamps_us,
        "keyframe": tl.keyframe, "frame_paths": tl.frame_paths, "frame_ok": tl.frame_ok,
        "fill_from": tl.fill_from.astype(np.int32), "gap": tl.gap,
        "lidar2global": tl.lidar2global, "cam2lidar": tl.frame_cam2lidar().astype(np.float32),
        "boxes": ib.boxes, "box_mask": ib.box_mask, "view_boxes": ib.view_boxes, "view_box_mask": ib.view_box_mask,
        "visibility": ib.visibility, "num_lidar_pts": ib.num_lidar_pts,
        **{f"bev_{cells}": arr for cells, arr in bev_packed.items()},
    }
    for name, arr in frame_arrays.items():
        _put(g, name, arr, frame_axis=True)
    n = len(ann.instance_tokens)
    for name, arr in {"intrinsics": tl.intrinsics.astype(np.float32), "box_class": ann.box_class, "box_track": np.arange(n, dtype=np.int32),
                      "instance_tokens": np.array(ann.instance_tokens, dtype=object)}.items():
        _put(g, name, arr, frame_axis=False)
    g.attrs.update({
        "scene_name": tl.scene_name, "scene_token": tl.scene_token, "split": scene_split(version, tl.scene_name),
        "dataset": version, "description": tl.description, "map_name": tl.map_name, "views": tl.views,
        "image_size": list(tl.image_size), "source_sizes": tl.source_sizes.tolist(), "num_frames": tl.num_frames, "num_objects": n,
        "problems": [asdict(p) for p in tl.problems], "inputs_hash": digest,
        "schema_version": schema.SCHEMA_VERSION, "store_version": STORE_VERSION,
    })
    g.attrs["complete"] = True   # last: a store without it is rebuilt
    return uri, True


def open_scene_store(uri: str, frames: slice | None = None, heavy: bool = True) -> SceneArrays:
    """Read a scene store; ``frames`` reads only that frame range of the frame-indexed arrays (only the chunks
    it touches); ``heavy=False`` skips boxes/masks/BEV (enough for the clip index)."""
    g = _open(uri, "r")
    if g is None:
        raise FileNotFoundError(f"no scene store at {uri}: run `python -m pipeline.scenes.run` first")
    at = dict(g.attrs)
    if not at.get("complete"):
        raise ValueError(f"scene store {uri} is incomplete (interrupted write): rerun pipeline.scenes.run")
    total = int(at["num_frames"])
    sl = frames if frames is not None else slice(0, total)
    start, stop, step = sl.indices(total)
    if step != 1:
        raise ValueError(f"frames={frames}: only contiguous ranges are supported")
    sl = slice(start, stop)

    def read(name, frame_axis=False):
        arr = g[name]
        return np.asarray(arr[sl] if frame_axis else arr[...])

    heavy_arrays = {name: read(name, True) for name in HEAVY if name not in BEV_FIELDS} if heavy else {}
    if heavy:
        heavy_arrays["bev"] = {cells: read(f"bev_{cells}", True) for cells, _ in schema.BEV_GRIDS}
    return SceneArrays(
        scene_name=at["scene_name"], scene_token=at["scene_token"], split=at["split"], dataset=at["dataset"],
        description=at["description"], map_name=at["map_name"], views=list(at["views"]),
        image_size=tuple(at["image_size"]), timestamps_us=read("timestamps_us", True),
        keyframe=read("keyframe", True), frame_paths=read("frame_paths", True).astype(str),
        frame_ok=read("frame_ok", True), fill_from=read("fill_from", True), gap=read("gap", True),
        lidar2global=read("lidar2global", True), source_sizes=np.asarray(at["source_sizes"], np.int64).reshape(-1, 2),
        intrinsics=read("intrinsics"), cam2lidar=read("cam2lidar", True),
        view_timestamps_us=read("view_timestamps_us", True), box_class=read("box_class"),
        box_track=read("box_track"), instance_tokens=read("instance_tokens").astype(str),
        frame_start=start, num_scene_frames=total, problems=list(at.get("problems", [])), uri=uri,
        **heavy_arrays)
