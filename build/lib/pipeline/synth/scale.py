"""A trainval-sized synthetic table set: the tables and map of pipeline/synth/writer.py at nuScenes' record
counts, without per-frame files, for the scale benchmark (bench/scale.py), never the test suite.

    mdv2-synth --out DIR --scenes 850 --seconds 20 --tables-only

Same scenes, poses, calibration, annotations and dropped images (``--drop-rate``, ``--bursts``,
``--regular-rig`` are honoured) as a full ``mdv2-synth`` run with the same arguments, with three
differences, all for speed and disk:
- no rendering: every camera ``sample_data`` of one (folder, channel) names ONE shared file
  (``samples/CAM_FRONT/synth-shared__CAM_FRONT.jpg``, a grey JPEG of the image size), so the
  scenes stage finds every listed file, and the LIDAR_TOP records likewise;
- five RADAR_* channels at 13 Hz (records only, never a keyframe) as in the real logs: they bring
  ``sample_data``/``ego_pose`` to trainval's counts (850 x 20 s -> about 2.6 M each);
- tables are streamed to disk scene by scene (one compact record per line), so memory
  stays at one scene's records whatever the scene count; no ``synth_truth.parquet``.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from pipeline.contract import schema
from pipeline.synth.tables import MapBuilder, TABLE_NAMES, chain, lidar_points, pose_records, static_tables, token
from pipeline.synth.tables import write_mask_png

RADARS = ("RADAR_FRONT", "RADAR_FRONT_LEFT", "RADAR_FRONT_RIGHT", "RADAR_BACK_LEFT", "RADAR_BACK_RIGHT")
RADAR_PERIOD_US = 76_923   # 13 Hz, as nuScenes' radars
SHARED = "synth-shared"
PER_SCENE = ("scene", "log", "sample", "sample_data", "ego_pose", "sample_annotation", "instance",
             "calibrated_sensor")


class _JsonArrayWriter:
    """One table file written record by record, one compact record per line (json's C encoder: a pretty
    printer is 2x slower than the rest of the writer); any JSON array loads the same in the devkit."""

    def __init__(self, path: Path):
        self.f = open(path, "wb", buffering=1 << 22)
        self.n = 0

    def extend(self, records: list[dict]) -> None:
        for r in records:
            self.f.write((b"[\n" if self.n == 0 else b",\n")
                         + json.dumps(r, sort_keys=True, separators=(",", ":")).encode())
            self.n += 1

    def close(self) -> None:
        self.f.write(b"[\n]" if self.n == 0 else b"\n]")
        self.f.close()


def shared_filename(folder: str, channel: str) -> str:
    ext = "jpg" if channel.startswith("CAM") else "pcd.bin" if channel == schema.LIDAR_CHANNEL else "pcd"
    return f"{folder}/{channel}/{SHARED}__{channel}.{ext}"


def _radar_records(sw, samples: list[dict], seed: int) -> tuple[list[dict], list[dict], list[dict]]:
    """(calibrated_sensor, sample_data, ego_pose) records of the five radars over the scene's span."""
    i = sw.i
    key_ts = np.array([s["timestamp"] for s in samples], np.int64)
    ts = sw.t0 + 10_000 + np.arange(int(sw.n_frames * 83_333 // RADAR_PERIOD_US)) * RADAR_PERIOD_US
    nxt = np.minimum(np.searchsorted(key_ts, ts), len(samples) - 1)   # sweeps belong to the next keyframe
    poses = sw.ego.pose(sw.scene_seconds(ts))                         # (R, 4, 4)
    cs, sd, ego = [], [], []
    for k, ch in enumerate(RADARS):
        cs_tok = token(seed, "cs", i, ch)
        yaw = (0.0, 1.2, -1.2, 2.6, -2.6)[k]
        cs.append({"token": cs_tok, "sensor_token": token(seed, "sensor", ch),
                   "translation": [3.4 * np.cos(yaw), 0.8 * np.sin(yaw), 0.6],
                   "rotation": [float(np.cos(yaw / 2)), 0.0, 0.0, float(np.sin(yaw / 2))], "camera_intrinsic": []})
        ego_tokens = [token(seed, "ego", i, ch, f) for f in range(len(ts))]
        ego += pose_records(ego_tokens, ts, poses)
        recs = [{"token": token(seed, "sd", i, ch, f), "sample_token": samples[nxt[f]]["token"],
                 "ego_pose_token": ego_tokens[f], "calibrated_sensor_token": cs_tok, "timestamp": int(t),
                 "fileformat": "pcd", "is_key_frame": False, "height": 0, "width": 0,
                 "filename": shared_filename("sweeps", ch), "prev": "", "next": ""} for f, t in enumerate(ts)]
        chain(recs)
        sd += recs
    return cs, sd, ego


def _write_shared_files(root: Path, image_size: tuple[int, int]) -> None:
    w, h = image_size
    ok, jpg = cv2.imencode(".jpg", np.full((h, w, 3), 128, np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
    payload = {"jpg": jpg.tobytes(), "pcd.bin": lidar_points(), "pcd": b""}
    for ch in list(schema.VIEWS) + [schema.LIDAR_CHANNEL] + list(RADARS):
        for folder in ("samples", "sweeps"):
            name = shared_filename(folder, ch)
            p = root / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(payload[name.split(".", 1)[1]])


def write_tables_only(out, scenes: int = 850, seconds: float = 20.0, image_size: tuple[int, int] = (1600, 900),
                      seed: int = 0, version: str = "v1.0-synth", map_name: str = "singapore-onenorth",
                      progress: bool = False, **rig):
    """Write the tables, maps and a few shared files under ``out``; returns a pipeline.synth.writer.SynthInfo.
    ``rig``: the rig and drop settings of SynthConfig (rig, drop_rate, bursts, burst3_share), as a full run."""
    from pipeline.synth.writer import TRUTH_FILE, SynthConfig, SynthInfo, _SceneWriter
    cfg = SynthConfig(out=Path(out), scenes=scenes, seconds=seconds, image_size=tuple(image_size), seed=seed,
                      version=version, map_name=map_name, progress=progress, tables_only=True, **rig)
    cfg.check()
    start = time.perf_counter()
    table_dir = cfg.out / version
    table_dir.mkdir(parents=True, exist_ok=True)
    channels = list(schema.VIEWS) + [schema.LIDAR_CHANNEL] + list(RADARS)
    modality = {ch: "camera" if ch.startswith("CAM") else "radar" if ch.startswith("RADAR") else "lidar"
                for ch in channels}
    static = static_tables(seed, channels, modality)
    writers = {name: _JsonArrayWriter(table_dir / f"{name}.json") for name in PER_SCENE}
    counts = dict.fromkeys(PER_SCENE, 0)
    mapb = MapBuilder(seed, map_name)
    roads, names, log_tokens = [], [], []
    for i in tqdm(range(scenes), desc="synth tables", unit="scene", disable=not progress, file=sys.stderr):
        t = dict(static) | {name: [] for name in PER_SCENE}
        sw = _SceneWriter(cfg, i, t, mapb, None)
        sw.write()
        for r in t["sample_data"]:
            r["filename"] = shared_filename("samples" if r["is_key_frame"] else "sweeps", r["filename"].split("/")[1])
        cs, sd, ego = _radar_records(sw, t["sample"], seed)
        t["calibrated_sensor"] += cs
        t["sample_data"] += sd
        t["ego_pose"] += ego
        for name in PER_SCENE:
            writers[name].extend(t[name])
            counts[name] += len(t[name])
        roads.append((sw.road, sw.s_range[0], sw.s_range[1]))
        names.append(sw.name)
        log_tokens += [r["token"] for r in t["log"]]
    for w in writers.values():
        w.close()
    map_tok = token(seed, "map", map_name)
    static["map"] = [{"token": map_tok, "log_tokens": log_tokens, "category": "semantic_prior",
                      "filename": f"maps/{map_tok}.png"}]
    for name in TABLE_NAMES:
        if name not in PER_SCENE:
            (table_dir / f"{name}.json").write_bytes(
                json.dumps(static[name], sort_keys=True, indent=0, separators=(",", ":")).encode())
    write_mask_png(cfg.out / "maps" / f"{map_tok}.png", map_name, roads)
    mapb.write(cfg.out)
    _write_shared_files(cfg.out, cfg.image_size)
    num_bytes = sum(p.stat().st_size for p in cfg.out.rglob("*") if p.is_file())
    return SynthInfo(root=cfg.out, version=version, scene_names=names, map_name=map_name, rig=cfg.rig,
                     truth_path=cfg.out / TRUTH_FILE, num_images=0, seconds_taken=time.perf_counter() - start,
                     num_bytes=num_bytes, num_samples=counts["sample"], num_annotations=counts["sample_annotation"],
                     image_size=cfg.image_size, extra={"records": counts})
