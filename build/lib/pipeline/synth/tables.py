"""nuScenes v1.0 table records and the map-expansion JSON of the synthetic writer.

Only the formats live here (field names as the real devkit reads them); what goes in them is
decided by pipeline/synth/writer.py. Tokens are 32 hex digits like nuScenes, derived by hashing the seed
and a stable name, so the same arguments give byte-identical tables.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa

from pipeline.contract.geometry import matrix_to_quat
from pipeline.synth.world import LIDAR_TRANSLATION, Band, Line, Road

TRUTH_COLUMNS = ("scene_name", "instance_token", "category", "class_name", "channel", "sample_data_token",
                 "timestamp_us", "frame_index", "is_key_frame", "dropped", "x", "y", "z", "w", "l", "h", "yaw",
                 "present", "cam_x", "cam_y", "cam_z", "cam_qw", "cam_qx", "cam_qy", "cam_qz")
_FLOAT_COLUMNS = ("x", "y", "z", "w", "l", "h", "yaw", "cam_x", "cam_y", "cam_z", "cam_qw", "cam_qx", "cam_qy",
                  "cam_qz")
TABLE_NAMES = ("attribute", "calibrated_sensor", "category", "ego_pose", "instance", "log", "map", "sample",
               "sample_annotation", "sample_data", "scene", "sensor", "visibility")
MAP_VERSION = "1.3"
# canvas sizes [m] of the real maps (as in NuScenesMapExplorer.get_map_mask)
MAP_CANVAS = {"singapore-onenorth": (1585.6, 2025.0), "singapore-hollandvillage": (2808.3, 2922.9),
              "singapore-queenstown": (3228.6, 3687.1), "boston-seaport": (2979.5, 2118.1)}

CATEGORY_DESCRIPTIONS = {
    "vehicle.car": "Vehicle designed primarily for personal use.",
    "vehicle.truck": "Vehicles primarily designed to haul cargo.",
    "vehicle.construction": "Vehicles primarily designed for construction.",
    "vehicle.bus.rigid": "Rigid bus.",
    "vehicle.trailer": "Any vehicle trailer.",
    "movable_object.barrier": "Temporary road barrier placed in the scene.",
    "vehicle.motorcycle": "Gasoline or electric powered 2-wheeled vehicle.",
    "vehicle.bicycle": "Human or electric powered 2-wheeled vehicle.",
    "human.pedestrian.adult": "Adult subcategory.",
    "movable_object.trafficcone": "All types of traffic cone.",
    "animal": "All animals, e.g. cats, rats, dogs, deer, birds.",
    "vehicle.emergency.police": "All types of police vehicle.",
}
ATTRIBUTES = {
    "vehicle.moving": "Vehicle is moving.", "vehicle.stopped": "Vehicle, with a driver/rider, is stationary.",
    "vehicle.parked": "Vehicle is stationary with no driver/rider.",
    "cycle.with_rider": "There is a rider on the bicycle or motorcycle.",
    "cycle.without_rider": "There is NO rider on the bicycle or motorcycle.",
    "pedestrian.moving": "The human is moving.", "pedestrian.standing": "The human is standing.",
}
VISIBILITY = (("1", "v0-40", "visibility of whole object is between 0 and 40%"),
              ("2", "v40-60", "visibility of whole object is between 40 and 60%"),
              ("3", "v60-80", "visibility of whole object is between 60 and 80%"),
              ("4", "v80-100", "visibility of whole object is between 80 and 100%"))


def token(seed: int, *parts: object) -> str:
    return hashlib.md5("/".join(map(str, (seed,) + parts)).encode()).hexdigest()


def attribute_for(category: str, speed: float) -> list[str]:
    """Attribute names as nuScenes would give them for this category and speed."""
    if category.startswith("human.pedestrian"):
        return ["pedestrian.moving" if speed > 0.3 else "pedestrian.standing"]
    if category in ("vehicle.bicycle", "vehicle.motorcycle"):
        return ["cycle.with_rider"]
    if category.startswith("vehicle."):
        return ["vehicle.moving" if speed > 0.3 else "vehicle.parked"]
    return []


def static_tables(seed: int, channels: list[str], modality: dict[str, str]) -> dict[str, list[dict]]:
    return {
        "category": [{"token": token(seed, "category", name), "name": name, "description": desc, "index": i}
                     for i, (name, desc) in enumerate(CATEGORY_DESCRIPTIONS.items())],
        "attribute": [{"token": token(seed, "attribute", name), "name": name, "description": desc}
                      for name, desc in ATTRIBUTES.items()],
        "visibility": [{"token": t, "level": lv, "description": desc} for t, lv, desc in VISIBILITY],
        "sensor": [{"token": token(seed, "sensor", ch), "channel": ch, "modality": modality[ch]} for ch in channels],
    }


def write_tables(table_dir: Path, tables: dict[str, list[dict]]) -> int:
    """Write every table as sorted compact JSON; returns bytes written."""
    table_dir.mkdir(parents=True, exist_ok=True)
    total = 0
    for name in TABLE_NAMES:
        data = json.dumps(tables[name], sort_keys=True, indent=0, separators=(",", ":")).encode()
        (table_dir / f"{name}.json").write_bytes(data)
        total += len(data)
    return total


# ---- map expansion -----------------------------------------------------------------------------

class MapBuilder:
    """Accumulates node/line/polygon geometry and the layer records of one map-expansion JSON."""

    LAYERS = ("drivable_area", "road_segment", "road_block", "lane", "ped_crossing", "walkway", "stop_line",
              "carpark_area", "road_divider", "lane_divider", "traffic_light", "lane_connector")

    def __init__(self, seed: int, map_name: str):
        self.seed, self.map_name = seed, map_name
        self.obj: dict = {"version": MAP_VERSION, "canvas_edge": list(MAP_CANVAS[map_name]),
                          "node": [], "line": [], "polygon": [], "arcline_path_3": {}, "connectivity": {}}
        for layer in self.LAYERS:
            self.obj[layer] = []
        self._n = 0
        self._drivable: dict[str, dict] = {}

    def _tok(self, *parts: object) -> str:
        self._n += 1
        return token(self.seed, "map", self.map_name, self._n, *parts)

    def _nodes(self, xy: np.ndarray) -> list[str]:
        toks = []
        for x, y in np.round(xy, 4):
            t = self._tok("node")
            self.obj["node"].append({"token": t, "x": float(x), "y": float(y)})
            toks.append(t)
        return toks

    def polygon(self, xy: np.ndarray, holes: list[np.ndarray] = ()) -> str:
        t = self._tok("polygon")
        self.obj["polygon"].append({"token": t, "exterior_node_tokens": self._nodes(xy),
                                    "holes": [{"node_tokens": self._nodes(h)} for h in holes]})
        return t

    def line(self, xy: np.ndarray) -> str:
        t = self._tok("line")
        self.obj["line"].append({"token": t, "node_tokens": self._nodes(xy)})
        return t

    def add_scene(self, scene: str, road: Road, elements: list[Band | Line]) -> None:
        """Turn one scene's bands/lines into layer records; drivable_area = road + car parks."""
        drivable = {"token": self._tok("drivable_area", scene), "polygon_tokens": []}
        self.obj["drivable_area"].append(drivable)
        crossings: list[tuple[Band, str]] = []
        for el in elements:
            if isinstance(el, Line):
                rec = {"token": self._tok(el.layer), "line_token": self.line(road.polyline(el.s0, el.s1, el.d))}
                if el.layer == "lane_divider":
                    rec["lane_divider_segments"] = []
                self.obj[el.layer].append(rec)
                continue
            holes = [road.band(*h) for h in el.holes]
            poly = self.polygon(road.band(el.s0, el.s1, el.d0, el.d1), holes)
            if el.layer == "drivable_area":
                drivable["polygon_tokens"].append(poly)
                continue
            rec = {"token": self._tok(el.layer), "polygon_token": poly}
            if el.layer == "carpark_area":
                drivable["polygon_tokens"].append(self.polygon(road.band(el.s0, el.s1, el.d0, el.d1), holes))
                rec.update(orientation=0.0, road_block_token="")
            elif el.layer == "ped_crossing":
                rec["road_segment_token"] = ""
                crossings.append((el, rec["token"]))
            elif el.layer == "road_block":
                rec.update(from_edge_line_token="", to_edge_line_token="", road_segment_token="")
            elif el.layer == "stop_line":
                near = [t for c, t in crossings if abs((c.s0 + c.s1) / 2 - (el.s0 + el.s1) / 2) < 8.0]
                rec.update(stop_line_type="PED_CROSSING", ped_crossing_tokens=near, traffic_light_tokens=[],
                           road_block_token="")
            self.obj[el.layer].append(rec)

    def write(self, root: Path) -> Path:
        path = root / "maps" / "expansion" / f"{self.map_name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(json.dumps(self.obj, sort_keys=True, separators=(",", ":")).encode())
        return path


def write_mask_png(path: Path, map_name: str, roads: list[tuple[Road, float, float]]) -> None:
    """The `map` table's semantic-prior mask, coarse (10 m/px) drivable raster: the devkit only
    opens it lazily; nothing in this pipeline reads it."""
    w, h = MAP_CANVAS[map_name]
    res = 10.0
    mask = np.zeros((int(np.ceil(h / res)), int(np.ceil(w / res))), np.uint8)
    for road, s0, s1 in roads:
        poly = road.band(s0, s1, -7.0, 7.0, step=5.0)
        px = np.stack([poly[:, 0] / res, mask.shape[0] - poly[:, 1] / res], -1)  # image y points down
        cv2.fillPoly(mask, [np.round(px).astype(np.int32)], 255)
    ok, data = cv2.imencode(".png", mask)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.tobytes())


# ---- helpers of the writer ---------------------------------------------------------------------

def lidar_points() -> bytes:
    """A tiny valid LIDAR_TOP payload: 36 ground points on a 10 m ring, (x, y, z, intensity, ring) float32."""
    a = np.linspace(0, 2 * np.pi, 36, endpoint=False)
    pts = np.stack([10 * np.cos(a), 10 * np.sin(a), np.full_like(a, -LIDAR_TRANSLATION[2]),
                    np.full_like(a, 10.0), np.zeros_like(a)], -1)
    return pts.astype(np.float32).tobytes()


def pose_records(tokens: list[str], stamps: np.ndarray, poses: np.ndarray) -> list[dict]:
    """ego_pose records from (F, 4, 4) ego -> global transforms."""
    trans = np.round(poses[:, :3, 3], 6).tolist()
    quats = np.round(matrix_to_quat(poses[:, :3, :3]), 9).tolist()
    return [{"token": tok, "timestamp": int(ts), "translation": tr, "rotation": q}
            for tok, ts, tr, q in zip(tokens, stamps, trans, quats)]


def chain(records: list[dict]) -> None:
    for a, b in zip(records[:-1], records[1:]):
        a["next"], b["prev"] = b["token"], a["token"]


def truth_table(parts: list[dict]) -> pa.Table:
    """Concatenate the per-scene column dicts of the truth into one typed table."""
    cols = {c: [v for p in parts for v in p[c]] for c in TRUTH_COLUMNS}
    types = {"timestamp_us": pa.int64(), "frame_index": pa.int32(), "is_key_frame": pa.bool_(),
             "dropped": pa.bool_(), "present": pa.bool_(), "class_name": pa.string()}
    return pa.table({c: pa.array(v, type=types.get(c, pa.float64() if c in _FLOAT_COLUMNS else pa.string()))
                     for c, v in cols.items()})
