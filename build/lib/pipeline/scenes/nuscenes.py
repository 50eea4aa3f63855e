"""The 12 Hz frame timeline of a nuScenes scene by trigger round, dropped images repaired.

In nuScenes the 20 Hz LiDAR triggers the cameras as it sweeps past them (12 camera rounds per 20
sweeps, CAM_FRONT steps of 50 or 100 ms), each camera at its own shutter offset in the round. A row of
the timeline is one trigger round from the scene's first to its last keyframe: every CAM_FRONT image,
plus the rounds whose CAM_FRONT image was dropped but whose other cameras recorded them (their reference
time is the round's trigger: its LIDAR_TOP sweep minus CAM_FRONT's lead; pipeline/scenes/rounds.py).
Every view is paired by round: its image in round i is the one within ``tolerance`` of the round's
time + that view's rig offset (the median over the scene's keyframes, whose sample records say which
images belong together).

An image that is missing, outside its round's window, already taken by another round, or whose file is
absent on disk (``frame_ok`` False, described in ``problems``) is repaired: the view takes the nearest
recorded image of the same camera (previous or next round, the closer in time; ``fill_from``), and its
path, exposure time and ego pose -- hence its boxes and extrinsics downstream -- are that image's. Only
a round no camera recorded is a ``gap`` (a CAM_FRONT-time step above ``RIG_MAX_STEP_US`` + slack):
no clip spans it. Which clips may hold how many repaired frames is the clip index's rule
(pipeline/scenes/clipyield.py).

Scene splits: v1.0-trainval/test/mini use the devkit's official lists
(nuscenes.utils.splits). Any other version (synthetic or custom data) uses the
official list when the scene name is in train/val, otherwise the deterministic
rule ``split_for_unlisted`` (sha256 of the name; about 1 in 5 scenes go to val).

The devkit is used only through ``nusc.get(table, token)``, ``nusc.scene``,
``nusc.version`` and ``nusc.dataroot``.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from pipeline.contract import cli, schema
from pipeline.contract.geometry import invert_transform, make_transform
from pipeline.scenes.rounds import dropped_front_rounds, interpolate_pose, nearest_fill, trigger_time

DEFAULT_TOLERANCE_S = 0.02  # a view's frame lies within 20 ms of its expected time in the round (rounds >= 50 ms apart)
RIG_MAX_STEP_US = 100_000   # the lidar-triggered rig's longest CAM_FRONT step (2 sweeps at 20 Hz)
GAP_SLACK_US = 25_000       # a CAM_FRONT step above 125 ms means a dropped frame (even after a 50 ms step)
VAL_EVERY = 5               # unlisted scenes: sha256(name) % 5 == 0 -> val


@dataclass
class FrameProblem:
    frame: int
    view: str
    reason: str   # "no_match" | "reused" | "file_missing" | "gap"
    detail: str
    filled_from: int = -1   # round whose image of the same camera repairs it (-1: not repaired)


@dataclass
class Timeline:
    scene_name: str
    scene_token: str
    description: str
    map_name: str
    views: list[str]
    image_size: tuple[int, int]          # (W, H) of the reference camera's images
    timestamps_us: np.ndarray            # (F,) int64, reference camera
    keyframe: np.ndarray                 # (F,) bool
    sample_tokens: list[str]             # (F,) sample token at keyframes, "" elsewhere
    frame_paths: np.ndarray              # (F, V) object/str, relative to dataroot
    frame_ok: np.ndarray                 # (F, V) bool
    lidar2global: np.ndarray             # (F, 4, 4) float64
    intrinsics: np.ndarray               # (V, 3, 3) float64, source resolution
    cam2lidar: np.ndarray                # (V, 4, 4) float64, static calibration (camera -> ego -> LiDAR)
    view_timestamps_us: np.ndarray       # (F, V) int64 exposure of each view's frame (expected time if missing)
    view_ego2global: np.ndarray          # (F, V, 4, 4) float64 each view frame's own ego pose
    cam2ego: np.ndarray                  # (V, 4, 4) float64 calibration
    rig_offsets_us: np.ndarray           # (V,) int64 each view's shutter offset vs CAM_FRONT in a round
    source_sizes: np.ndarray             # (V, 2) int64 each camera's image (W, H)
    fill_from: np.ndarray                # (F, V) int64 round whose image frame_paths names (-1: none)
    gap: np.ndarray                      # (F,) bool a hole in the trigger rounds before this frame
    problems: list[FrameProblem] = field(default_factory=list)
    records: dict = field(default_factory=dict)  # source records used (for the input hash)

    @property
    def num_frames(self) -> int:
        return int(self.timestamps_us.shape[0])

    def frame_cam2lidar(self) -> np.ndarray:
        """(F, V, 4, 4) camera v at its exposure -> global through its own ego pose -> LiDAR(t)."""
        global2lidar = invert_transform(self.lidar2global)                       # (F, 4, 4)
        return global2lidar[:, None] @ self.view_ego2global @ self.cam2ego[None]


@lru_cache(maxsize=4)
def load_nuscenes(dataroot: str, version: str):
    """One devkit instance per (dataroot, version) per process (loading trainval takes ~30 s)."""
    from nuscenes.nuscenes import NuScenes
    check_tables(dataroot, version)
    return NuScenes(version=version, dataroot=dataroot, verbose=False)


def check_tables(dataroot: str, version: str) -> str:
    """The table folder DATAROOT/VERSION, or a user error naming the versions that are there."""
    path = os.path.join(dataroot, version)
    if os.path.isfile(os.path.join(path, "scene.json")):
        return path
    if not os.path.isdir(dataroot):
        raise cli.InputNotFound(f"--dataroot {dataroot} is not a folder: pass the nuScenes root (the folder holding "
                                f"{version}/, samples/, sweeps/, maps/)")
    have = sorted(d for d in os.listdir(dataroot) if os.path.isfile(os.path.join(dataroot, d, "scene.json")))
    raise cli.InputNotFound(f"no nuScenes tables at {path} (no scene.json): "
                            + (f"--version is one of {have} here" if have else
                               "--dataroot must be the folder holding VERSION/, samples/, sweeps/, maps/"))


@lru_cache(maxsize=8)
def load_map(dataroot: str, map_name: str):
    from nuscenes.map_expansion.map_api import NuScenesMap
    path = os.path.join(dataroot, "maps", "expansion", f"{map_name}.json")
    if not os.path.exists(path):
        raise cli.InputNotFound(f"map expansion {path} is missing: install the nuScenes map expansion "
                                f"(maps/expansion/*.json) under the dataroot")
    return NuScenesMap(dataroot=dataroot, map_name=map_name)


def split_for_unlisted(scene_name: str) -> str:
    digest = hashlib.sha256(scene_name.encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") % VAL_EVERY == 0 else "train"


def scene_split(version: str, scene_name: str) -> str:
    from nuscenes.utils.splits import create_splits_scenes
    splits = create_splits_scenes()
    if version == "v1.0-mini":
        table = {"train": splits["mini_train"], "val": splits["mini_val"]}
    elif version == "v1.0-test":
        table = {"test": splits["test"]}
    else:
        table = {"train": splits["train"], "val": splits["val"]}
    for name, scenes in table.items():
        if scene_name in scenes:
            return name
    if version in ("v1.0-trainval", "v1.0-mini", "v1.0-test"):
        raise ValueError(f"scene {scene_name!r} of {version} is not in the devkit's official split lists")
    return split_for_unlisted(scene_name)


def find_scene(nusc, scene_name: str) -> dict:
    for s in nusc.scene:
        if s["name"] == scene_name:
            return s
    raise KeyError(f"scene {scene_name!r} not in {nusc.version} at {nusc.dataroot} "
                   f"(has {len(nusc.scene)} scenes, e.g. {[s['name'] for s in nusc.scene[:3]]})")


def _channel_chain(nusc, sd_token: str) -> list[dict]:
    """All sample_data of one sensor in the scene, in time order (prev/next chains stop at scene ends)."""
    first = nusc.get("sample_data", sd_token)
    while first["prev"]:
        first = nusc.get("sample_data", first["prev"])
    chain = [first]
    while chain[-1]["next"]:
        chain.append(nusc.get("sample_data", chain[-1]["next"]))
    return chain


def _pose(rec: dict) -> np.ndarray:
    return make_transform(np.asarray(rec["rotation"]), np.asarray(rec["translation"]))


def rig_offsets(nusc, sample_tokens: list[str], views: tuple[str, ...]) -> np.ndarray:
    """(V,) each view's median shutter offset vs CAM_FRONT over the keyframes (a sample's records are one round)."""
    ref = schema.REFERENCE_VIEW
    rows = []
    for s in sample_tokens:
        data = nusc.get("sample", s)["data"]
        t_ref = nusc.get("sample_data", data[ref])["timestamp"]
        rows.append([nusc.get("sample_data", data[v])["timestamp"] - t_ref for v in views])
    return np.round(np.median(np.asarray(rows, np.float64), 0)).astype(np.int64)


def _match_view(ref_ts: np.ndarray, chain: list[dict], tol_us: int, view: str, key_sd: dict[int, str],
                problems: list[FrameProblem]) -> tuple[list[str | None], np.ndarray]:
    """Pair one view's frames with the reference rounds; ``ref_ts`` (F,) is each round's expected time of this
    view (CAM_FRONT + its rig offset). Returns sd tokens (None = no frame in the round) and |dt| [us]."""
    ts = np.array([r["timestamp"] for r in chain], dtype=np.int64)
    f = ref_ts.shape[0]
    idx = np.clip(np.searchsorted(ts, ref_ts), 1, len(ts) - 1) if len(ts) > 1 else np.zeros(f, np.int64)
    left = np.maximum(idx - 1, 0)
    use_left = np.abs(ref_ts - ts[left]) <= np.abs(ts[idx] - ref_ts)
    near = np.where(use_left, left, idx)
    dt = np.abs(ts[near] - ref_ts)
    by_token = {r["token"]: i for i, r in enumerate(chain)}
    for frame, tok in key_sd.items():  # keyframes use the sample's own record
        if tok in by_token:
            near[frame], dt[frame] = by_token[tok], abs(ts[by_token[tok]] - ref_ts[frame])
    tokens: list[str | None] = [None] * f
    owner: dict[int, int] = {}
    for i in np.argsort(dt, kind="stable"):  # closest round wins a shared candidate
        if dt[i] > tol_us:
            problems.append(FrameProblem(int(i), view, "no_match",
                                         f"no {view} sample_data within {tol_us / 1000:.0f} ms of its expected time "
                                         f"t={ref_ts[i]} in this trigger round (nearest {chain[near[i]]['filename']} "
                                         f"is {dt[i] / 1000:.1f} ms away): the image was not recorded"))
        elif int(near[i]) in owner:
            problems.append(FrameProblem(int(i), view, "reused",
                                         f"nearest {view} frame {chain[near[i]]['filename']} already belongs to frame "
                                         f"{owner[int(near[i])]}; the frame for t={ref_ts[i]} is missing"))
        else:
            owner[int(near[i])] = int(i)
            tokens[i] = chain[near[i]]["token"]
    return tokens, dt


def _lidar_lead(nusc, sample_tokens: list[str]) -> float:
    """CAM_FRONT's median lead on the LIDAR_TOP sweep that triggers its round (a keyframe's sample time is
    that sweep's), in us."""
    leads = [s["timestamp"] - nusc.get("sample_data", s["data"][schema.REFERENCE_VIEW])["timestamp"]
             for s in (nusc.get("sample", t) for t in sample_tokens)]
    return float(np.median(leads)) if leads else 0.0


def build_timeline(nusc, scene_name: str, views: tuple[str, ...] = schema.VIEWS,
                   tolerance_s: float = DEFAULT_TOLERANCE_S, check_files: bool = True) -> Timeline:
    """The scene's 12 Hz trigger rounds, per-view images (dropped ones repaired), poses and calibration."""
    scene = find_scene(nusc, scene_name)
    log = nusc.get("log", scene["log_token"])
    first = nusc.get("sample", scene["first_sample_token"])
    last = nusc.get("sample", scene["last_sample_token"])
    ref = schema.REFERENCE_VIEW
    for v in (*views, ref):
        if v not in first["data"]:
            raise KeyError(f"scene {scene_name}: sample has no {v} data (has {sorted(first['data'])})")
    chains = {v: _channel_chain(nusc, first["data"][v]) for v in dict.fromkeys((*views, ref))}
    t0 = nusc.get("sample_data", first["data"][ref])["timestamp"]
    t1 = nusc.get("sample_data", last["data"][ref])["timestamp"]
    front = [r for r in chains[ref] if t0 <= r["timestamp"] <= t1]
    front_ts = np.array([r["timestamp"] for r in front], dtype=np.int64)
    key_tokens = [r["sample_token"] for r in front if r["is_key_frame"]]
    tol_us = int(round(tolerance_s * 1e6))
    problems: list[FrameProblem] = []

    # each view's shutter offset in a round, from the keyframes (a sample's records are one round)
    offsets = rig_offsets(nusc, key_tokens, views)                                  # (V,)
    # rounds whose CAM_FRONT image was dropped, from the other views' images; timed by their LiDAR trigger
    others = [np.array([r["timestamp"] for r in chains[v]], np.int64) - offsets[j]
              for j, v in enumerate(views) if v != ref]
    lidar = _channel_chain(nusc, first["data"][schema.LIDAR_CHANNEL])
    extra = trigger_time(dropped_front_rounds(front_ts, others, tol_us, RIG_MAX_STEP_US + GAP_SLACK_US),
                         np.array([r["timestamp"] for r in lidar], np.int64), _lidar_lead(nusc, key_tokens), tol_us)
    ref_ts = np.sort(np.concatenate([front_ts, extra]))                             # (F,)
    f, nv = len(ref_ts), len(views)
    front_row = np.searchsorted(ref_ts, front_ts)                                   # CAM_FRONT image -> its row
    keyframe = np.zeros(f, bool)
    keyframe[front_row] = [bool(r["is_key_frame"]) for r in front]
    sample_tokens = [""] * f
    for i, r in zip(front_row, front):
        sample_tokens[i] = r["sample_token"] if r["is_key_frame"] else ""
    v_tokens: dict[str, list[str | None]] = {}
    for j, v in enumerate(views):
        if v == ref:
            v_tokens[v] = [None] * f
            for i, r in zip(front_row, front):
                v_tokens[v][i] = r["token"]
            for i in np.flatnonzero(~np.isin(np.arange(f), front_row)):
                problems.append(FrameProblem(int(i), v, "no_match", f"no {v} image in this trigger round: the image "
                                             f"was not recorded; the round (t={ref_ts[i]}) is rebuilt from the other "
                                             f"views' images and its {schema.LIDAR_CHANNEL} sweep"))
            continue
        key_sd = {i: nusc.get("sample", s)["data"][v] for i, s in enumerate(sample_tokens) if s}
        v_tokens[v], _ = _match_view(ref_ts + offsets[j], chains[v], tol_us, v, key_sd, problems)

    recorded = np.array([[v_tokens[v][i] is not None for v in views] for i in range(f)], bool).reshape(f, nv)
    recs = [[nusc.get("sample_data", v_tokens[v][i]) if recorded[i, j] else None for j, v in enumerate(views)]
            for i in range(f)]
    paths = np.array([[r["filename"] if r else "" for r in row] for row in recs], dtype=object).reshape(f, nv)
    expected = ref_ts[:, None] + offsets[None, :]                                   # (F, V)
    view_ts = np.array([[r["timestamp"] if r else expected[i, j] for j, r in enumerate(row)]
                        for i, row in enumerate(recs)], np.int64).reshape(f, nv)
    ego_tok = [[r["ego_pose_token"] if r else None for r in row] for row in recs]
    if check_files:
        for i, j in zip(*np.nonzero(recorded)):
            if not os.path.exists(os.path.join(nusc.dataroot, paths[i, j])):
                recorded[i, j] = False
                problems.append(FrameProblem(int(i), views[j], "file_missing", f"{paths[i, j]} is listed in "
                                             f"sample_data but absent under {nusc.dataroot}"))
    # repair: a missing image takes the nearest recorded image of the same camera, at that image's exposure
    fill_from = nearest_fill(recorded, expected, view_ts)                           # (F, V)
    src = {(p.frame, p.view): p for p in problems}
    for i, j in zip(*np.nonzero(~recorded)):
        k = int(fill_from[i, j])
        if k >= 0:
            paths[i, j], view_ts[i, j], ego_tok[i][j] = paths[k, j], view_ts[k, j], ego_tok[k][j]
            p = src[(int(i), views[j])]
            p.filled_from = k
            p.detail += f"; repaired with its frame {k} image {paths[k, j]} (at that image's exposure)"
    gap = np.zeros(f, bool)
    if f > 2:
        steps = np.diff(ref_ts)
        for i in np.nonzero(steps > RIG_MAX_STEP_US + GAP_SLACK_US)[0]:
            gap[i + 1] = True   # no camera recorded a round here: no clip may span the hole
            problems.append(FrameProblem(int(i + 1), ref, "gap", f"{steps[i] / 1000:.0f} ms since the previous "
                                         f"round (the rig's rounds are at most {RIG_MAX_STEP_US / 1000:.0f} ms apart) "
                                         f"and no camera recorded a round in between"))

    # LiDAR(t): CAM_FRONT's ego pose at its exposure; a rebuilt round's pose is interpolated at its time
    pose_sd = sorted(((r["timestamp"], r["ego_pose_token"]) for ch in chains.values() for r in ch), key=lambda x: x)
    ref_ego = [None] * f
    for i, r in zip(front_row, front):
        ref_ego[i] = r["ego_pose_token"]
    ego = np.empty((f, 4, 4))
    have = np.array([t is not None for t in ref_ego], bool)
    if have.any():
        ego[have] = _ego_poses(nusc, [t for t in ref_ego if t is not None])
    if not have.all():
        near = _near_poses(pose_sd, ref_ts[~have])
        ego[~have] = interpolate_pose(np.array([t for t, _ in near]), _ego_poses(nusc, [k for _, k in near]),
                                      ref_ts[~have])
    # a view with no image at all (fill_from -1) borrows its round's pose; no clip uses it
    lost = [(i, j) for i, j in zip(*np.nonzero(fill_from < 0))]
    tokens = [t for row in ego_tok for t in row if t is not None]
    view_ego2global = np.empty((f, nv, 4, 4))
    flat = _ego_poses(nusc, tokens) if tokens else np.zeros((0, 4, 4))
    it = iter(flat)
    for i in range(f):
        for j in range(nv):
            view_ego2global[i, j] = next(it) if ego_tok[i][j] is not None else ego[i]
    lidar_cs = nusc.get("calibrated_sensor", lidar[0]["calibrated_sensor_token"])
    lidar2ego = _pose(lidar_cs)
    lidar2global = ego @ lidar2ego                                                       # (F, 4, 4)
    ego2lidar = invert_transform(lidar2ego)
    intrinsics, cam2ego, cams, sizes = [], [], [], []
    for v in views:
        first_sd = nusc.get("sample_data", first["data"][v])
        sizes.append((int(first_sd["width"]), int(first_sd["height"])))
        cs = nusc.get("calibrated_sensor", first_sd["calibrated_sensor_token"])
        cams.append(cs)
        intrinsics.append(np.asarray(cs["camera_intrinsic"], dtype=np.float64).reshape(3, 3))
        cam2ego.append(_pose(cs))
    cam2ego = np.stack(cam2ego)                                                          # (V, 4, 4)
    ref_rec = nusc.get("sample_data", first["data"][ref])
    problems.sort(key=lambda p: (p.frame, p.view, p.reason))
    return Timeline(
        scene_name=scene["name"], scene_token=scene["token"], description=scene.get("description", ""),
        map_name=log["location"], views=list(views), image_size=(int(ref_rec["width"]), int(ref_rec["height"])),
        timestamps_us=ref_ts, keyframe=keyframe, sample_tokens=sample_tokens, frame_paths=paths,
        frame_ok=recorded, lidar2global=lidar2global, intrinsics=np.stack(intrinsics),
        cam2lidar=ego2lidar[None] @ cam2ego, view_timestamps_us=view_ts,
        view_ego2global=view_ego2global, cam2ego=cam2ego, rig_offsets_us=offsets, problems=problems,
        source_sizes=np.asarray(sizes, np.int64).reshape(-1, 2), fill_from=fill_from, gap=gap,
        records={"scene": scene, "log": log, "ref_ego": ref_ego, "ref_ts": ref_ts.tolist(),
                 "view_ego": ego_tok, "view_ts": view_ts.tolist(), "lidar_cs": lidar_cs, "cams": cams,
                 "paths": paths.tolist(), "ok": recorded.tolist(), "fill": fill_from.tolist(), "lost": lost})


def _near_poses(pose_sd: list[tuple[int, str]], times: np.ndarray) -> list[tuple[int, str]]:
    """The (timestamp, ego_pose token) pairs bracketing each time, sorted by time (deduplicated)."""
    ts = np.array([t for t, _ in pose_sd], np.int64)
    k = np.searchsorted(ts, times)
    pick = sorted({int(i) for kk in k for i in (kk - 1, kk) if 0 <= i < len(ts)})
    return [pose_sd[i] for i in pick]


def _ego_poses(nusc, tokens: list[str]) -> np.ndarray:
    """(P, 4, 4) ego -> global of ego_pose tokens."""
    poses = [nusc.get("ego_pose", t) for t in tokens]
    return make_transform(np.array([p["rotation"] for p in poses], np.float64).reshape(-1, 4),
                          np.array([p["translation"] for p in poses], np.float64).reshape(-1, 3))
