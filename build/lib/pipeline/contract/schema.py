"""The sample contract: one clip = one webdataset sample (DESIGN.md §3).

Every stage and every test imports this module, so it depends on numpy and the standard library only
(no torch, no ray). It is the one place for the view order, the class tables, the member table (with what
a reader needs: axes, units, frames, padding), the key format (path templates: pipeline/contract/paths.py)
and the BEV conventions (grid rule and helpers in pipeline/contract/bevgrid.py).

Time model (schema 2.0): frame t is the reference camera's (CAM_FRONT) exposure, and LiDAR(t) is the
LiDAR pose at that instant (LIDAR_TOP calibration on CAM_FRONT's ego pose). Each camera fires at its own
time (nuScenes: about -8 to +35 ms around CAM_FRONT), so every geometric quantity is evaluated at the
time it describes: ``boxes`` at CAM_FRONT's exposure, ``view_boxes[t, v]`` at view v's exposure,
``cam2lidar[t, v]`` through view v's own ego pose. Their exposure times are ``meta["view_timestamps_us"]``.

Coordinate conventions (paper Section 3):
- Geometry of a frame is in that frame's LiDAR coordinates. For nuScenes the LIDAR_TOP frame has x to
  the right of the car, y forward, z up. ``traj[t]`` maps LiDAR(t) -> LiDAR(0) (homogeneous 4x4).
- A box is ``x, y, z, w, l, h, yaw``: centre, size (w across, l along the heading, h up; nuScenes
  ``wlh`` order) and yaw = rotation about +z of the box's heading (its local +x axis) measured from the
  LiDAR +x axis, in radians, wrapped to [-pi, pi).

BEV grid (schema 3.0): ``bev[t, c, i, j]`` is a G x G grid centred on the LiDAR origin of frame t,
covering 100 m x 100 m; G and the cell size r depend on the bucket's height (``bev_grid``, the authors'
rule: 200 cells of 0.5 m below height 424, 400 of 0.25 m from 424 up) and are in ``meta["bev"]``. Row
``i`` covers ``y = 50 - r * (i + 0.5)`` metres (row 0 is farthest ahead), column ``j`` covers
``x = -50 + r * (j + 0.5)`` (column 0 is farthest left): shown as an image, "ahead" is up and "right" is
right. Bits are packed along the column axis with ``np.packbits`` (big-endian bit order), so a stored
frame is (8, G, G / 8) uint8.

Dropped frames (schema 3.0): ``fill_mask[t, v]`` marks a view-frame whose image was not recorded and was
repaired with the nearest image of the same camera (previous or next trigger round); every member of that
(t, v) describes the image actually used, at its own exposure. ``source_intrinsics`` and
``meta["source_size"]`` keep each camera's original K and image size (``intrinsics``: the stored K).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from pipeline.contract.npyio import all_finite, npy_bytes, read_npy_fast  # noqa: F401  (all_finite, npy_bytes: API)

SCHEMA_VERSION = "3.0"
PIPELINE_VERSION = "0.1.0"

# ---- views and classes -------------------------------------------------------------

VIEWS: tuple[str, ...] = ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT",
                          "CAM_BACK_RIGHT", "CAM_BACK", "CAM_BACK_LEFT")
REFERENCE_VIEW = "CAM_FRONT"  # its timestamps define the 12 Hz timeline
LIDAR_CHANNEL = "LIDAR_TOP"
FPS = 12

OBJECT_CLASSES: tuple[str, ...] = ("car", "truck", "construction_vehicle", "bus", "trailer",
                                   "barrier", "motorcycle", "bicycle", "pedestrian", "traffic_cone")
CLASS_ID = {name: i for i, name in enumerate(OBJECT_CLASSES)}

# nuScenes category -> detection class, as in the nuScenes detection benchmark
# (nuscenes.eval.detection.utils.category_to_detection_name). Others are dropped.
NUSCENES_CATEGORY_TO_CLASS: dict[str, str] = {
    "movable_object.barrier": "barrier", "vehicle.bicycle": "bicycle", "vehicle.bus.bendy": "bus",
    "vehicle.bus.rigid": "bus", "vehicle.car": "car", "vehicle.construction": "construction_vehicle",
    "vehicle.motorcycle": "motorcycle", "human.pedestrian.adult": "pedestrian", "human.pedestrian.child": "pedestrian",
    "human.pedestrian.construction_worker": "pedestrian", "human.pedestrian.police_officer": "pedestrian",
    "movable_object.trafficcone": "traffic_cone", "vehicle.trailer": "trailer", "vehicle.truck": "truck",
}

MAP_CLASSES: tuple[str, ...] = ("drivable_area", "ped_crossing", "walkway", "stop_line",
                                "carpark_area", "road_divider", "lane_divider", "road_block")
MAP_POLYGON_CLASSES = ("drivable_area", "ped_crossing", "walkway", "stop_line", "carpark_area", "road_block")
MAP_LINE_CLASSES = ("road_divider", "lane_divider")
NUSCENES_MAPS = ("boston-seaport", "singapore-onenorth", "singapore-hollandvillage", "singapore-queenstown")

# ---- BEV grid (pipeline/contract/bevgrid.py: the per-bucket rule, cell centres, packing) ----------

from pipeline.contract.bevgrid import (BEV_CELLS, BEV_EXTENT_M, BEV_GRIDS, BEV_LARGE_CELLS,  # noqa: E402,F401
                                       BEV_LARGE_MIN_HEIGHT, BEV_LARGE_RESOLUTION_M, BEV_PACKED_COLS,
                                       BEV_RESOLUTION_M, bev_cell_centres, bev_grid, bev_packed_cols, pack_bev,
                                       unpack_bev)


# ---- VAE / frame-count rules ------------------------------------------------------

LATENT_CHANNELS = 16
VAE_TEMPORAL_COMPRESSION = 4
VAE_SPATIAL_COMPRESSION = 8


def valid_num_frames(t: int) -> bool:
    """CogVAE encodes the first frame alone, then groups of 4: a sample may have any 4k+1 frames."""
    return isinstance(t, (int, np.integer)) and t >= 1 and (t - 1) % VAE_TEMPORAL_COMPRESSION == 0


def valid_bucket_frames(t: int) -> bool:
    """The lengths the pipeline builds: 1 or 8k+1 (the paper's buckets; CogVAE's encode() works on
    8-frame chunks, so latents of a shorter clip are an exact prefix of a longer one's only then)."""
    return valid_num_frames(t) and (t == 1 or (t - 1) % 8 == 0)


def latent_frames(t: int) -> int:
    return (t - 1) // VAE_TEMPORAL_COMPRESSION + 1


# ---- keys and paths (templates in pipeline/contract/paths.py) ---------------------

from pipeline.contract.paths import (  # noqa: E402,F401
                                     BUCKET_TEMPLATE, CAPTIONS_FILE, CLIP_INDEX_FILE, DATASET_CARD_FILE, DATASET_INFO_FILE, KEY_TEMPLATE, LOCK_FILE, MANIFEST_TEMPLATE, QUARANTINE_FILE,
                                     SCENE_STORE_TEMPLATE, SHARD_TEMPLATE, TABLE_INDEX_TEMPLATE, WORK_DIR,
                                     bucket_name, manifest_path, scene_store_path, shard_path, table_index_path)


def sample_key(scene_name: str, start: int, num_frames: int, height: int, width: int) -> str:
    key = KEY_TEMPLATE.format(scene_name=scene_name, start=start, num_frames=num_frames, height=height, width=width)
    if "." in key:
        raise SchemaError("key", f"{key!r} contains '.', which webdataset treats as an extension separator; "
                                 "rename the scene")
    return key


# ---- the member table -------------------------------------------------------------

class SchemaError(ValueError):
    """A sample that breaks the contract; names the member and the reason."""

    def __init__(self, member: str, reason: str, key: str | None = None):
        self.member, self.reason, self.key = member, reason, key
        where = f"sample {key!r}, " if key else ""
        super().__init__(f"{where}member {member!r}: {reason}")


@dataclass(frozen=True)
class Member:
    name: str             # tar member suffix, e.g. "boxes.npy"
    dtype: str | None     # numpy dtype for .npy members
    shape: Callable[[dict], tuple] | None  # dims from {V, T, Tl, N, H, W, G}
    required: bool = True
    doc: str = ""
    # for readers (the dataset card and info.json, pipeline/shards/card.py): each axis as "SIZE name"
    axes: tuple[str, ...] = ()
    units: str = ""
    frame: str = ""       # coordinate frame (and the time it describes)
    padding: str = ""     # what fills the entries that hold nothing


_LATENT_AXES = ("V view", "16 channel", "T' latent_frame", "H/8 row", "W/8 col")
_BOX_UNITS, _MAT = "m (x y z w l h), rad (yaw)", ("3 row", "3 col")
_ABSENT = "N = the clip's objects (tracks); zeros where box_mask[t, n] is False (absent at frame t)"
MEMBERS: tuple[Member, ...] = (
    Member("meta.json", None, None, doc="clip metadata (fields: the card's meta.json table)"),
    Member("latent_mean.npy", "float16", lambda d: (d["V"], LATENT_CHANNELS, d["Tl"], d["H"] // 8, d["W"] // 8),
           doc="CogVAE posterior mean, unscaled", axes=_LATENT_AXES, units="latent (z = vae.scaling_factor x mean)",
           frame="view v's image; latent frame 0 = frame 0, latent frame k = frames 4k-3..4k"),
    Member("latent_std.npy", "float16", lambda d: (d["V"], LATENT_CHANNELS, d["Tl"], d["H"] // 8, d["W"] // 8),
           required=False, doc="CogVAE posterior std", axes=_LATENT_AXES, units="latent (unscaled)",
           frame="as latent_mean", padding="present exactly when meta latent is 'mean+std'"),
    Member("boxes.npy", "float32", lambda d: (d["T"], d["N"], 7),
           doc="reference boxes x y z w l h yaw at CAM_FRONT's exposure, in LiDAR(t)",
           axes=("T frame", "N object", "7 param"), units=_BOX_UNITS, frame="LiDAR(t)", padding=_ABSENT),
    Member("view_boxes.npy", "float32", lambda d: (d["T"], d["V"], d["N"], 7),
           doc="per-view boxes at view v's own exposure, in LiDAR(t)", axes=("T frame", "V view", "N object",
           "7 param"), units=_BOX_UNITS, frame="LiDAR(t), at meta view_timestamps_us[t][v]", padding=_ABSENT),
    Member("box_mask.npy", "bool", lambda d: (d["T"], d["N"]), doc="object present in frame",
           axes=("T frame", "N object"), padding="False: absent at frame t"),
    Member("box_view_mask.npy", "bool", lambda d: (d["T"], d["V"], d["N"]), doc="box visible in view (a corner in "
           "front of the camera and inside the image)", axes=("T frame", "V view", "N object"), padding="False"),
    Member("box_class.npy", "int8", lambda d: (d["N"],), doc="class id 0-9", axes=("N object",),
           units="class id (the card's class table)"),
    Member("box_track.npy", "int32", lambda d: (d["N"],), doc="instance index within the clip", axes=("N object",)),
    Member("intrinsics.npy", "float32", lambda d: (d["V"], 3, 3), doc="K at stored resolution",
           axes=("V view",) + _MAT, units="pixels of the stored H x W image", frame="camera (x right, y down, z fwd)"),
    Member("source_intrinsics.npy", "float32", lambda d: (d["V"], 3, 3),
           doc="K of the original image (meta source_size)", axes=("V view",) + _MAT,
           units="pixels of the source image", frame="camera (x right, y down, z fwd)"),
    Member("cam2lidar.npy", "float32", lambda d: (d["T"], d["V"], 4, 4),
           doc="camera v at its exposure -> global (its own ego pose) -> LiDAR(t)",
           axes=("T frame", "V view", "4 row", "4 col"), units="m", frame="camera(t, v) -> LiDAR(t)"),
    Member("fill_mask.npy", "bool", lambda d: (d["T"], d["V"]),
           doc="view-frame repaired with the nearest image of the same camera (meta filled)",
           axes=("T frame", "V view")),
    Member("traj.npy", "float32", lambda d: (d["T"], 4, 4), doc="LiDAR(t) -> LiDAR(0)",
           axes=("T frame", "4 row", "4 col"), units="m", frame="LiDAR(t) -> LiDAR(0)"),
    Member("bev.npy", "uint8", lambda d: (d["T"], len(MAP_CLASSES), d["G"], bev_packed_cols(d["G"])),
           doc="bit-packed BEV masks, G x G cells (meta bev)", axes=("T frame", "8 map_class", "G bev_row",
           "G/8 bev_col_packed"), units="bits (np.packbits, big-endian, along the last axis)", frame="LiDAR(t)"),
    Member("caption.txt", None, None, doc="UTF-8 text condition"),
)
MEMBER_NAMES = tuple(m.name for m in MEMBERS)
ARRAY_FIELDS = tuple(m.name[:-4] for m in MEMBERS if m.name.endswith(".npy"))

META_FIELDS: dict[str, type | tuple[type, ...]] = {
    "schema_version": str, "pipeline_version": str, "dataset": str, "split": str,
    "scene_token": str, "scene_name": str, "start_frame": int, "num_frames": int, "fps": (int, float),
    "height": int, "width": int, "views": list, "timestamps_us": list, "view_timestamps_us": list, "keyframes": list,
    "frames": list, "vae": dict, "latent": str, "caption": dict, "filled": list, "bev": dict, "source_size": list,
}
VAE_META_FIELDS = ("name", "scaling_factor", "temporal_compression", "spatial_compression")
CAPTION_META_FIELDS = ("source", "prompt_version", "model")
LATENT_KINDS = ("mean", "mean+std")


@dataclass
class Sample:
    """One decoded clip. Arrays keep the dtypes and shapes of the member table."""
    key: str
    meta: dict[str, Any]
    latent_mean: np.ndarray            # (V, 16, T', H/8, W/8) float16
    boxes: np.ndarray                  # (T, N, 7) float32, at CAM_FRONT's exposure
    view_boxes: np.ndarray             # (T, V, N, 7) float32, at each view's exposure
    box_mask: np.ndarray               # (T, N) bool
    box_view_mask: np.ndarray          # (T, V, N) bool
    box_class: np.ndarray              # (N,) int8
    box_track: np.ndarray              # (N,) int32
    intrinsics: np.ndarray             # (V, 3, 3) float32, at the stored resolution
    source_intrinsics: np.ndarray      # (V, 3, 3) float32, of the original images (meta source_size)
    cam2lidar: np.ndarray              # (T, V, 4, 4) float32
    fill_mask: np.ndarray              # (T, V) bool, repaired drops (meta filled)
    traj: np.ndarray                   # (T, 4, 4) float32
    bev: np.ndarray                    # (T, 8, G, G/8) uint8, packed (meta bev)
    caption: str
    latent_std: np.ndarray | None = None  # same shape as latent_mean, optional

    @property
    def num_frames(self) -> int:
        return int(self.meta["num_frames"])

    @property
    def views(self) -> list[str]:
        return list(self.meta["views"])

    def bev_masks(self) -> np.ndarray:
        """(T, 8, G, G) bool."""
        return unpack_bev(self.bev, int(self.meta["bev"]["cells"]))

    def to_dict(self) -> dict[str, Any]:
        d = {"meta": self.meta, "caption": self.caption}
        for name in ARRAY_FIELDS:
            v = getattr(self, name)
            if v is not None:
                d[name] = v
        return d


# ---- (de)serialisation ------------------------------------------------------------

def npy_load(data: bytes, member: str = "?", key: str | None = None) -> np.ndarray:
    fast = read_npy_fast(data)
    if fast is not None:
        return fast
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # truncated header, object arrays, garbage
        raise SchemaError(member, f"not a readable .npy without pickle ({e})", key) from None


def meta_bytes(meta: Mapping[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def schema_major(version: str) -> int:
    return int(str(version).split(".")[0])


def check_schema_version(version: Any, key: str | None = None) -> None:
    try:
        major = schema_major(version)
    except (ValueError, TypeError):
        raise SchemaError("meta.json", f"schema_version {version!r} is not 'MAJOR.MINOR'", key) from None
    if major != schema_major(SCHEMA_VERSION):
        raise SchemaError("meta.json", f"schema major version {major} (shard schema {version}) is not supported by "
                                       f"this code (schema {SCHEMA_VERSION}); rebuild the shards with this "
                                       f"pipeline or use a matching release of the trainer", key)


def validate_meta(meta: Mapping[str, Any], key: str | None = None) -> dict[str, int]:
    """Check meta.json and return the dims {V, T, Tl, H, W} that the arrays must follow."""
    if not isinstance(meta, Mapping):
        raise SchemaError("meta.json", "must be a JSON object", key)
    check_schema_version(meta.get("schema_version"), key)
    for name, typ in META_FIELDS.items():
        if name not in meta:
            raise SchemaError("meta.json", f"missing field {name!r}", key)
        if not isinstance(meta[name], typ) or (typ is int and isinstance(meta[name], bool)):
            raise SchemaError("meta.json", f"field {name!r} must be {typ}, got {type(meta[name]).__name__}", key)
    t = meta["num_frames"]
    if not valid_num_frames(t):
        raise SchemaError("meta.json", f"num_frames T={t} must be 4k+1 (CogVAE: first frame alone, "
                                       f"then groups of 4)", key)
    h, w = meta["height"], meta["width"]
    if h <= 0 or w <= 0 or h % VAE_SPATIAL_COMPRESSION or w % VAE_SPATIAL_COMPRESSION:
        raise SchemaError("meta.json", f"height x width {h}x{w} must be positive multiples of 8", key)
    views = meta["views"]
    if not views or not all(isinstance(v, str) for v in views) or len(set(views)) != len(views):
        raise SchemaError("meta.json", f"views {views!r} must be distinct non-empty names", key)
    v = len(views)
    for name, n in (("timestamps_us", t), ("view_timestamps_us", t), ("keyframes", t), ("frames", t)):
        if len(meta[name]) != n:
            raise SchemaError("meta.json", f"{name} has {len(meta[name])} entries, expected T={n}", key)
    for name, what in (("frames", "paths"), ("view_timestamps_us", "timestamps")):
        if any(not isinstance(row, list) or len(row) != v for row in meta[name]):
            raise SchemaError("meta.json", f"{name} must be T x V = {t} x {v} {what}", key)
    if meta["latent"] not in LATENT_KINDS:
        raise SchemaError("meta.json", f"latent must be one of {LATENT_KINDS}, got {meta['latent']!r}", key)
    for sub, fields in (("vae", VAE_META_FIELDS), ("caption", CAPTION_META_FIELDS)):
        missing = [f for f in fields if f not in meta[sub]]
        if missing:
            raise SchemaError("meta.json", f"{sub} is missing {missing}", key)
    _validate_meta_3(meta, t, v, h, key)
    return {"V": v, "T": t, "Tl": latent_frames(t), "H": h, "W": w, "G": meta["bev"]["cells"]}


def _ints(x: Any, n: int) -> bool:
    return isinstance(x, list) and len(x) == n and all(isinstance(i, int) and not isinstance(i, bool) for i in x)


def _validate_meta_3(meta: Mapping[str, Any], t: int, v: int, h: int, key: str | None) -> None:
    """Schema 3.0's meta fields: the bucket's BEV grid, the filled view-frames, the source image sizes."""
    cells, cell_m = bev_grid(h)
    got = meta["bev"]
    if got.get("cells") != cells or not isinstance(got.get("cell_m"), (int, float)) or got["cell_m"] != cell_m:
        raise SchemaError("meta.json", f"bev {got} must be {{'cells': {cells}, 'cell_m': {cell_m}}} at height {h} "
                                       f"(schema.bev_grid)", key)
    filled = meta["filled"]
    if not all(_ints(p, 2) and 0 <= p[0] < t and 0 <= p[1] < v for p in filled) or \
            filled != sorted(filled) or len({tuple(p) for p in filled}) != len(filled):
        raise SchemaError("meta.json", f"filled must be sorted distinct [t, v] pairs, t < T={t}, v < V={v}", key)
    if len(meta["source_size"]) != v or not all(_ints(s, 2) and min(s) > 0 for s in meta["source_size"]):
        raise SchemaError("meta.json", f"source_size must be V={v} [W, H] pairs of positive integers", key)


def _check_array(member: Member, arr: np.ndarray, dims: dict, key: str | None) -> None:
    if arr.dtype != np.dtype(member.dtype):
        raise SchemaError(member.name, f"dtype {arr.dtype}, expected {member.dtype}", key)
    expected = member.shape(dims)
    if tuple(arr.shape) != expected:
        raise SchemaError(member.name, f"shape {tuple(arr.shape)}, expected {expected} "
                                       f"(V={dims['V']}, T={dims['T']}, N={dims.get('N')})", key)
    if arr.dtype.kind == "f" and not all_finite(arr):
        bad = int((~np.isfinite(arr)).sum())
        raise SchemaError(member.name, f"{bad} non-finite values (NaN/Inf); the encoder or source data is broken", key)


def _validate_arrays(arrays: Mapping[str, np.ndarray], dims: dict, key: str | None) -> None:
    if "box_class" not in arrays:
        raise SchemaError("box_class.npy", "missing", key)
    dims = dict(dims, N=int(np.asarray(arrays["box_class"]).shape[0]) if np.ndim(arrays["box_class"]) == 1 else -1)
    for m in MEMBERS:
        if m.dtype is None:
            continue
        name = m.name[:-4]
        if name not in arrays or arrays[name] is None:
            if m.required:
                raise SchemaError(m.name, "missing", key)
            continue
        _check_array(m, np.asarray(arrays[name]), dims, key)
    cls = np.asarray(arrays["box_class"])
    if cls.size and (cls.min() < 0 or cls.max() >= len(OBJECT_CLASSES)):
        raise SchemaError("box_class.npy", f"class ids must be in 0..{len(OBJECT_CLASSES) - 1}", key)


def _validate_cross(meta: Mapping[str, Any], arrays: Mapping[str, Any], key: str | None) -> None:
    """What meta.json and the arrays must agree on: the filled view-frames, the latent kind."""
    fill = arrays.get("fill_mask")
    if fill is not None and np.argwhere(np.asarray(fill)).tolist() != meta["filled"]:
        raise SchemaError("fill_mask.npy", f"True at {np.argwhere(fill).tolist()[:6]} but meta filled is "
                                           f"{meta['filled'][:6]}: they must name the same view-frames", key)
    has_std = arrays.get("latent_std") is not None
    if (meta["latent"] == "mean+std") != has_std:
        raise SchemaError("latent_std.npy", f"meta says latent={meta['latent']!r} but latent_std is "
                                            f"{'present' if has_std else 'absent'}", key)


def encode_sample(sample: Mapping[str, Any] | Sample) -> dict[str, bytes]:
    """Validate and serialise a sample dict (keys: meta, caption and the array fields) to tar members.

    Returns {member_name: bytes} in the fixed MEMBERS order (optional members omitted)."""
    d = sample.to_dict() if isinstance(sample, Sample) else sample
    meta = d.get("meta")
    key = sample.key if isinstance(sample, Sample) else d.get("key")
    dims = validate_meta(meta, key)
    arrays = {k: d.get(k) for k in ARRAY_FIELDS}
    _validate_arrays(arrays, dims, key)
    _validate_cross(meta, arrays, key)
    caption = d.get("caption")
    if not isinstance(caption, str):
        raise SchemaError("caption.txt", "caption must be a str", key)
    out: dict[str, bytes] = {}
    for m in MEMBERS:
        if m.name == "meta.json":
            out[m.name] = meta_bytes(meta)
        elif m.name == "caption.txt":
            out[m.name] = caption.encode("utf-8")
        elif arrays.get(m.name[:-4]) is not None:
            out[m.name] = npy_bytes(np.asarray(arrays[m.name[:-4]]))
    return out


def decode_sample(members: Mapping[str, bytes], key: str | None = None) -> Sample:
    """Parse and validate tar members (names with or without the ``{key}.`` prefix) into a Sample.

    webdataset yields dicts like {"__key__": ..., "meta.json": b"...", ...}; those work as they are."""
    key = key or members.get("__key__")
    if isinstance(key, bytes):
        key = key.decode()
    raw = {name: data for name, data in members.items() if not name.startswith("__")}
    if "meta.json" not in raw:
        raise SchemaError("meta.json", "missing", key)
    try:
        meta = json.loads(raw["meta.json"])
    except (ValueError, UnicodeDecodeError) as e:
        raise SchemaError("meta.json", f"not valid JSON ({e})", key) from None
    dims = validate_meta(meta, key)
    unknown = sorted(set(raw) - set(MEMBER_NAMES))
    if unknown:
        raise SchemaError(unknown[0], f"unknown member (schema {SCHEMA_VERSION} knows {list(MEMBER_NAMES)})", key)
    arrays = {}
    for name in ARRAY_FIELDS:
        member = name + ".npy"
        arrays[name] = npy_load(raw[member], member, key) if member in raw else None
    _validate_arrays(arrays, dims, key)
    _validate_cross(meta, arrays, key)
    if "caption.txt" not in raw:
        raise SchemaError("caption.txt", "missing", key)
    try:
        caption = raw["caption.txt"].decode("utf-8")
    except UnicodeDecodeError:
        raise SchemaError("caption.txt", "not valid UTF-8", key) from None
    return Sample(key=key or "", meta=meta, caption=caption, **arrays)


def ordered_members(members: Mapping[str, bytes]) -> list[tuple[str, bytes]]:
    """Members in the fixed MEMBERS order, so tars are byte-identical across runs."""
    rank = {n: i for i, n in enumerate(MEMBER_NAMES)}
    return sorted(members.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))
