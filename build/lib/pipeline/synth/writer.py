"""Synthetic dataset in the real nuScenes v1.0 layout (tables, samples/, sweeps/, maps/), with exact truth.

    python -m pipeline.synth --out DIR [--scenes N] [--seconds S] [--image-size WxH] [--seed K]
                             [--version NAME] [--map-name NAME] [--regular-rig] [--drop-rate R] [--bursts]

writes DIR/<version>/*.json (all 13 tables), DIR/samples|sweeps/<channel>/*.jpg|.pcd.bin,
DIR/maps/expansion/<map>.json (map expansion 1.3), DIR/maps/<token>.png and DIR/synth_truth.parquet,
the continuous-time truth of every annotated object at every camera frame (the annotations are
only its samples at the keyframes, as in nuScenes). The real `nuscenes.nuscenes.NuScenes` and
`nuscenes.map_expansion.map_api.NuScenesMap` load the result unchanged.

World: pipeline/synth/world.py; images: pipeline/synth/render.py; table formats:
pipeline/synth/tables.py. Same arguments -> byte-identical files.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.contract import cli, schema
from pipeline.contract.geometry import invert_transform, matrix_to_quat, yaw_to_quat
from pipeline.synth.render import CLASS_COLORS, OTHER_COLOR, SceneArt, render_view
from pipeline.synth.tables import (TRUTH_COLUMNS, MapBuilder, attribute_for, chain, lidar_points, pose_records,
                                   static_tables, token, truth_table, write_mask_png, write_tables)
from pipeline.synth.rig import BURST3_SHARE, dropped_images, lidar_triggered_times, regular_times
from pipeline.synth.world import (CAMERA_RIG, LIDAR_TRANSLATION, ObjectTrack, camera_intrinsics, camera_rotation,
                                  camera_to_ego, lidar_rotation, make_ego, make_map_elements, make_objects, make_road)

TRUTH_FILE = "synth_truth.parquet"
JPEG_QUALITY = 90
BASE_TIMESTAMP_US = 1_532_402_927_000_000  # July 2018, like the real logs
SCENE_SPACING_US = 3_600_000_000           # scenes one hour apart
CELL_M = 500.0                             # each scene's road sits in its own 500 m map cell
RIGS = ("nuscenes", "regular")             # lidar-triggered rig (default) | the old regular 12 Hz rig
DROP_RATE = 0.01                           # share of each camera's non-keyframe images dropped (nuscenes rig)


@dataclass
class SynthConfig:
    out: Path
    scenes: int = 2
    seconds: float = 20.0
    image_size: tuple[int, int] = (1600, 900)  # (W, H)
    seed: int = 0
    version: str = "v1.0-synth"
    map_name: str = "singapore-onenorth"
    progress: bool = True
    rig: str = "nuscenes"       # see RIGS
    drop_rate: float = DROP_RATE
    tables_only: bool = False   # no per-frame files (pipeline/synth/scale.py, the scale benchmark)
    bursts: bool = False        # drops in runs of 2-3 consecutive images of a camera (rig.BURST_LENGTHS)
    burst3_share: float = BURST3_SHARE
    drops: dict | None = None   # explicit {channel: [frame, ...]} drops of scene 0 (tests), besides the rate

    @property
    def regular(self) -> bool:
        return self.rig == "regular"

    def check(self) -> None:
        if self.rig not in RIGS:
            raise cli.BadInput(f"rig {self.rig!r} is not one of {RIGS}")
        if not 0.0 <= self.drop_rate < 0.5:
            raise cli.BadInput(f"--drop-rate {self.drop_rate} must be in [0, 0.5)")
        if not 0.0 <= self.burst3_share <= 1.0:
            raise cli.BadInput(f"--burst3-share {self.burst3_share} must be in [0, 1]")
        if self.scenes < 1:
            raise cli.BadInput(f"--scenes must be >= 1, got {self.scenes}")
        if round(self.seconds * schema.FPS) < 11:
            raise cli.BadInput(f"--seconds {self.seconds} gives fewer than 11 camera frames (two keyframes "
                               "need at least 11 at 12 Hz); use --seconds >= 1")
        w, h = self.image_size
        if w < 16 or h < 16:
            raise cli.BadInput(f"--image-size {w}x{h} is too small; use at least 16x16 (default 1600x900)")
        if self.map_name not in schema.NUSCENES_MAPS:
            raise cli.BadInput(f"--map-name {self.map_name!r} is not one of the nuScenes maps "
                               f"{schema.NUSCENES_MAPS} (the devkit's NuScenesMap accepts only those)")


@dataclass
class SynthInfo:
    root: Path
    version: str
    scene_names: list[str]
    map_name: str
    truth_path: Path
    num_images: int
    seconds_taken: float
    num_bytes: int = 0
    num_samples: int = 0
    num_annotations: int = 0
    image_size: tuple[int, int] = (1600, 900)
    rig: str = "nuscenes"
    extra: dict = field(default_factory=dict)


def keyframe_indices(rng: np.random.Generator, num_frames: int, gaps: tuple[int, int] = (5, 7)) -> np.ndarray:
    """Camera frame indices of the keyframes: first and last frame, gaps of lo..hi frames (about 2 Hz)."""
    lo, hi = gaps
    span = num_frames - 1
    m = max(1, int(round(span / 6)))
    m = min(max(m, -(-span // hi)), span // lo)
    out = np.full(m, lo)
    for _ in range(span - lo * m):
        out[rng.choice(np.flatnonzero(out < hi))] += 1
    if lo < 5:  # the real logs: mostly 6, some shorter and longer gaps
        for _ in range(m):
            i, j = rng.integers(m, size=2)
            if out[i] > lo and out[j] < hi:
                out[i] -= 1
                out[j] += 1
    return np.concatenate([[0], np.cumsum(out)])


def _class_of(category: str) -> str | None:
    return schema.NUSCENES_CATEGORY_TO_CLASS.get(category)





# the caption of `--captions dataset`: what render.py draws, by the rules of captions/prompts/v1.txt (no objects)
SCENE_DESCRIPTION = ("A synthetic scene on a clear, sunny day: a paved road through flat, open grassland under a "
                     "blue sky.")


class _SceneWriter:
    """Writes one scene's files and appends its records to the shared tables."""

    def __init__(self, cfg: SynthConfig, index: int, tables: dict[str, list[dict]], mapb: MapBuilder,
                 bar: tqdm | None):
        self.cfg, self.i, self.t, self.bar = cfg, index, tables, bar
        self.seed = cfg.seed
        self.rng = np.random.default_rng([cfg.seed, index])
        self.name = f"synth-{index:04d}"
        self.logfile = f"n015-synth-s{cfg.seed}-{index:04d}+0800"
        self.t0 = BASE_TIMESTAMP_US + index * SCENE_SPACING_US
        self.n_frames = int(round(cfg.seconds * schema.FPS))
        self.tilted = not cfg.regular   # mount roll/pitch of the real rig
        self.kf = keyframe_indices(self.rng, self.n_frames, (5, 7) if cfg.regular else (4, 7))
        self.ego = None
        self._build_world(mapb)

    def _build_world(self, mapb: MapBuilder) -> None:
        rng, cfg = self.rng, self.cfg
        probe = make_ego(rng, None)  # speeds first, so the road can be sized to the drive
        s_end = float(probe.arc(cfg.seconds + 0.5))
        s_lo, s_hi = -100.0, s_end + 180.0
        cell = (self.i % 3, (self.i // 3) % 4)
        road = make_road(rng, (0.0, 0.0), s_lo - 20, s_hi + 20)
        mid, _ = road.frame((s_lo + s_hi) / 2)
        road.xy += np.array([300.0 + CELL_M * cell[0], 300.0 + CELL_M * cell[1]]) - mid
        probe.road = road
        self.road, self.ego, self.s_range = road, probe, (s_lo, s_hi)
        self.elements = make_map_elements(rng, road, s_lo, s_hi, holes=not cfg.regular)
        self.tracks: list[ObjectTrack] = make_objects(rng, road, probe, cfg.seconds)
        self.art = SceneArt(road, self.elements)
        mapb.add_scene(self.name, road, self.elements)

    def _times(self) -> dict[str, np.ndarray]:
        rig = regular_times if self.cfg.regular else lidar_triggered_times
        times, self.key_lidar = rig(self.rng, self.n_frames, self.t0 + 10_000, self.kf)
        return times

    def plan(self) -> dict[str, np.ndarray]:
        """Trigger times per channel and the dropped images (self.dropped), drawn once (before write())."""
        if getattr(self, "_planned", None) is None:
            self._planned = self._times()
            cfg = self.cfg
            self.dropped = dropped_images(self.rng, self.n_frames, self.kf, 0.0 if cfg.regular else cfg.drop_rate,
                                          cfg.bursts, cfg.burst3_share, (cfg.drops or {}) if self.i == 0 else None)
        return self._planned

    def images_to_draw(self) -> int:
        self.plan()
        return sum(int((~d).sum()) for d in self.dropped.values())

    def scene_seconds(self, ts: np.ndarray) -> np.ndarray:
        return (np.asarray(ts, np.int64) - self.t0) / 1e6

    def write(self) -> tuple[int, list[dict]]:
        cfg, seed, i, t = self.cfg, self.seed, self.i, self.t
        root = cfg.out
        w, h = cfg.image_size
        log_tok, scene_tok = token(seed, "log", i), token(seed, "scene", i)
        t["log"].append({"token": log_tok, "logfile": self.logfile, "vehicle": "n015", "location": cfg.map_name,
                         "date_captured": "2018-07-24"})
        times = self.plan()
        # ---- samples (keyframes at the lidar timestamps)
        samples = [{"token": token(seed, "sample", i, j), "timestamp": int(ts), "scene_token": scene_tok,
                    "prev": "", "next": ""} for j, ts in enumerate(self.key_lidar)]
        chain(samples)
        t["sample"] += samples
        t["scene"].append({"token": scene_tok, "log_token": log_tok, "nbr_samples": len(samples),
                           "first_sample_token": samples[0]["token"], "last_sample_token": samples[-1]["token"],
                           "name": self.name, "description": SCENE_DESCRIPTION})
        key_ts = np.asarray([s["timestamp"] for s in samples])
        # ---- calibrated sensors
        cs_tok = {}
        for ch in schema.VIEWS:
            cs_tok[ch] = token(seed, "cs", i, ch)
            t["calibrated_sensor"].append({
                "token": cs_tok[ch], "sensor_token": token(seed, "sensor", ch),
                "translation": list(CAMERA_RIG[ch][1]),
                "rotation": [float(v) for v in np.round(matrix_to_quat(camera_rotation(ch, self.tilted)), 12)],
                "camera_intrinsic": camera_intrinsics(ch, w, h).round(6).tolist()})
        lid = schema.LIDAR_CHANNEL
        cs_tok[lid] = token(seed, "cs", i, lid)
        t["calibrated_sensor"].append({"token": cs_tok[lid], "sensor_token": token(seed, "sensor", lid),
                                       "translation": list(LIDAR_TRANSLATION),
                                       "rotation": [float(v) for v in
                                                    np.round(matrix_to_quat(lidar_rotation(self.tilted)), 12)],
                                       "camera_intrinsic": []})
        # ---- sample_data + ego poses for every sensor frame
        sd_tokens: dict[str, list[str]] = {}
        pose_of: dict[str, np.ndarray] = {}
        is_key: dict[str, np.ndarray] = {}
        for ch, ts_all in times.items():
            kept = ~self.dropped[ch] if ch != lid else np.ones(len(ts_all), bool)
            ts = ts_all[kept]                                        # a dropped image has no record at all
            poses = self.ego.pose(self.scene_seconds(ts))           # (F, 4, 4) ego -> global
            key = np.isin(np.flatnonzero(kept), self.kf) if ch != lid else np.isin(ts, key_ts)
            # keyframe -> its own sample; sweep -> the next keyframe's sample (devkit get_boxes assumes it)
            sample_idx = np.cumsum(key) - 1
            sample_idx = np.where(key, sample_idx, sample_idx + 1)
            rounds = np.flatnonzero(kept)
            ego_tokens = [token(seed, "ego", i, ch, f) for f in rounds]
            t["ego_pose"] += pose_records(ego_tokens, ts, poses)
            recs = []
            for j, (f, stamp) in enumerate(zip(rounds, ts)):
                tok = token(seed, "sd", i, ch, f)
                folder = "samples" if key[j] else "sweeps"
                ext = "jpg" if ch != lid else "pcd.bin"
                ep = ego_tokens[j]
                recs.append({"token": tok, "sample_token": samples[min(sample_idx[j], len(samples) - 1)]["token"],
                             "ego_pose_token": ep, "calibrated_sensor_token": cs_tok[ch], "timestamp": int(stamp),
                             "fileformat": "jpg" if ch != lid else "pcd", "is_key_frame": bool(key[j]),
                             "height": h if ch != lid else 0, "width": w if ch != lid else 0,
                             "filename": f"{folder}/{ch}/{self.logfile}__{ch}__{int(stamp)}.{ext}",
                             "prev": "", "next": ""})
            chain(recs)
            t["sample_data"] += recs
            sd_tokens[ch] = [r["token"] for r in recs]
            pose_of[ch], is_key[ch] = poses, key
            if ch == lid and not cfg.tables_only:
                payload = lidar_points()
                for r in recs:
                    p = root / r["filename"]
                    p.parent.mkdir(parents=True, exist_ok=True)
                    p.write_bytes(payload)
        self._annotate(samples, key_ts)
        if cfg.tables_only:
            self.truth = {}
            return 0, self.truth
        n_img = self._render(times, pose_of, sd_tokens, is_key, t["sample_data"])
        return n_img, self.truth

    def _annotate(self, samples: list[dict], key_ts: np.ndarray) -> None:
        seed, i, t = self.seed, self.i, self.t
        ts_s = self.scene_seconds(key_ts)
        ego_xy = self.ego.pose(ts_s)[:, :2, 3]                       # (K, 2)
        cat_tok = {c["name"]: c["token"] for c in t["category"]}
        att_tok = {a["name"]: a["token"] for a in t["attribute"]}
        self.annotated: list[tuple[ObjectTrack, str]] = []
        for tr in self.tracks:
            present = np.flatnonzero(tr.present(ts_s))
            if len(present) == 0:
                continue
            inst = token(seed, "instance", i, tr.key)
            boxes = tr.boxes(ts_s[present])                          # (A, 7)
            is_vehicle = tr.category.startswith("vehicle.")          # radar sees metal
            anns = []
            for j, box in zip(present, boxes):
                dist = float(np.linalg.norm(box[:2] - ego_xy[j]))
                area = (box[3] + box[4]) * box[5] / 2
                vis = "4" if dist < 20 else "3" if dist < 35 else "2" if dist < 50 else "1"
                anns.append({
                    "token": token(seed, "ann", i, tr.key, j), "sample_token": samples[j]["token"],
                    "instance_token": inst, "visibility_token": vis,
                    "attribute_tokens": [att_tok[a] for a in attribute_for(tr.category, tr.v)],
                    "translation": [float(v) for v in np.round(box[:3], 6)],
                    "size": [float(v) for v in np.round(box[3:6], 6)],
                    "rotation": [float(v) for v in np.round(yaw_to_quat(box[6]), 12)],
                    "num_lidar_pts": int(min(4000, 2500 * area / max(dist, 2.0) ** 2)) if dist < 70 else 0,
                    "num_radar_pts": int(1 + 60 // max(dist, 5)) if dist < 60 and is_vehicle else 0,
                    "prev": "", "next": ""})
            chain(anns)
            t["sample_annotation"] += anns
            t["instance"].append({"token": inst, "category_token": cat_tok[tr.category],
                                  "nbr_annotations": len(anns), "first_annotation_token": anns[0]["token"],
                                  "last_annotation_token": anns[-1]["token"]})
            self.annotated.append((tr, inst))

    def _render(self, times: dict[str, np.ndarray], pose_of: dict[str, np.ndarray],
                sd_tokens: dict[str, list[str]], is_key: dict[str, np.ndarray], sd_table: list[dict]) -> int:
        cfg = self.cfg
        w, h = cfg.image_size
        colors = [CLASS_COLORS.get(_class_of(tr.category) or "", OTHER_COLOR) for tr, _ in self.annotated]
        fname = {r["token"]: r["filename"] for r in sd_table[-sum(len(v) for v in sd_tokens.values()):]}
        truth = {c: [] for c in TRUTH_COLUMNS}
        n_img = 0
        for ch in schema.VIEWS:
            ts = times[ch]                                           # every trigger round, dropped ones too
            kept = ~self.dropped[ch]
            secs = self.scene_seconds(ts)
            # (N, F, 7) boxes and (N, F) presence of every annotated object at this camera's rounds
            boxes = np.stack([tr.boxes(secs) for tr, _ in self.annotated])
            present = np.stack([tr.present(secs) for tr, _ in self.annotated])
            k = camera_intrinsics(ch, w, h)
            cam2global = self.ego.pose(secs) @ camera_to_ego(ch, self.tilted)       # (F, 4, 4) true camera poses
            g2c_all = invert_transform(cam2global)
            arcs = self.ego.arc(secs)
            tokens = np.full(len(ts), "", dtype=object)
            tokens[kept] = sd_tokens[ch]
            key = np.isin(np.arange(len(ts)), self.kf)
            for f in np.flatnonzero(kept):
                sel = np.flatnonzero(present[:, f])
                img = render_view(self.art, float(arcs[f]), g2c_all[f], k, w, h, boxes[sel, f],
                                  [colors[n] for n in sel])
                ok, data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
                path = cfg.out / fname[tokens[f]]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data.tobytes())
                n_img += 1
                if self.bar is not None:
                    self.bar.update(1)
            nf = len(ts)
            cam_t = cam2global[:, :3, 3]
            cam_q = matrix_to_quat(cam2global[:, :3, :3])
            for tr_i, (tr, inst) in enumerate(self.annotated):
                truth["scene_name"] += [self.name] * nf
                truth["instance_token"] += [inst] * nf
                truth["category"] += [tr.category] * nf
                truth["class_name"] += [_class_of(tr.category)] * nf
                truth["channel"] += [ch] * nf
                truth["sample_data_token"] += tokens.tolist()
                truth["timestamp_us"] += ts.tolist()
                truth["frame_index"] += list(range(nf))
                truth["is_key_frame"] += key.tolist()
                truth["dropped"] += (~kept).tolist()
                for col, c in zip(("x", "y", "z", "w", "l", "h", "yaw"), range(7)):
                    truth[col] += boxes[tr_i, :, c].tolist()
                truth["present"] += present[tr_i].tolist()
                for c, col in enumerate(("cam_x", "cam_y", "cam_z")):
                    truth[col] += cam_t[:, c].tolist()
                for c, col in enumerate(("cam_qw", "cam_qx", "cam_qy", "cam_qz")):
                    truth[col] += cam_q[:, c].tolist()
        self.truth = truth
        return n_img


def write_dataset(out, scenes: int = 2, seconds: float = 20.0, image_size: tuple[int, int] = (1600, 900),
                  seed: int = 0, version: str = "v1.0-synth", map_name: str = "singapore-onenorth",
                  progress: bool = False, rig: str = "nuscenes", drop_rate: float = DROP_RATE, bursts: bool = False,
                  burst3_share: float = BURST3_SHARE, drops: dict | None = None) -> SynthInfo:
    """Write the synthetic nuScenes dataset under `out`; see the module docstring. ``drops``: explicit
    {channel: [frame, ...]} images of scene 0 not recorded (non-keyframes), besides ``drop_rate``."""
    cfg = SynthConfig(out=Path(out), scenes=scenes, seconds=seconds, image_size=tuple(image_size), seed=seed,
                      version=version, map_name=map_name, progress=progress, rig=rig, drop_rate=drop_rate,
                      bursts=bursts, burst3_share=burst3_share, drops=drops)
    cfg.check()
    start = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    channels = list(schema.VIEWS) + [schema.LIDAR_CHANNEL]
    modality = {ch: "camera" for ch in schema.VIEWS} | {schema.LIDAR_CHANNEL: "lidar"}
    tables = static_tables(seed, channels, modality)
    for name in ("scene", "sample", "sample_data", "sample_annotation", "instance", "calibrated_sensor", "ego_pose",
                 "log", "map"):
        tables[name] = []
    mapb = MapBuilder(seed, map_name)
    # each scene has its own generator: planning all first changes no byte, and the bar counts what is drawn
    writers = [_SceneWriter(cfg, i, tables, mapb, None) for i in range(scenes)]
    bar = tqdm(total=sum(sw.images_to_draw() for sw in writers), desc="synth images", unit="img",
               disable=not progress, file=sys.stderr)
    truth, n_img = [], 0
    for sw in writers:
        sw.bar = bar
        n, tr = sw.write()
        n_img += n
        truth.append(tr)
    bar.close()
    map_tok = token(seed, "map", map_name)
    tables["map"].append({"token": map_tok, "log_tokens": [r["token"] for r in tables["log"]],
                          "category": "semantic_prior", "filename": f"maps/{map_tok}.png"})
    write_mask_png(cfg.out / "maps" / f"{map_tok}.png", map_name,
                   [(sw.road, sw.s_range[0], sw.s_range[1]) for sw in writers])
    mapb.write(cfg.out)
    write_tables(cfg.out / version, tables)
    truth_path = cfg.out / TRUTH_FILE
    pq.write_table(truth_table(truth), truth_path, compression="zstd")
    num_bytes = sum(p.stat().st_size for p in cfg.out.rglob("*") if p.is_file())
    return SynthInfo(root=cfg.out, version=version, scene_names=[sw.name for sw in writers], map_name=map_name,
                     truth_path=truth_path, num_images=n_img, seconds_taken=time.perf_counter() - start,
                     num_bytes=num_bytes, num_samples=len(tables["sample"]),
                     num_annotations=len(tables["sample_annotation"]), image_size=cfg.image_size,
                     rig=cfg.rig)


def main(argv: list[str] | None = None) -> int:
    """mdv2-synth's command line: pipeline/synth/cli.py."""
    from pipeline.synth.cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
