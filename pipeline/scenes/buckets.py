"""Stage configs (pipeline/configs/stages/*.yaml, DESIGN.md §4) and the clip index (parquet).

A bucket is (H, W, T) plus a batch size (read by the trainer) and a clip start stride.
Clips of a video bucket start every ``stride`` frames (default T: non-overlapping);
image buckets (T = 1) take the keyframes; a "full" bucket takes one clip per scene,
the longest 8k+1 run of usable frames (key and num_frames carry the actual T, the
bucket name ends in ``_tfull``). A clip may hold repaired view-frames (dropped images filled
from the same camera's nearest round); it is left out, and reported as a QuarantineRecord
(stage "scenes"), only when a view misses more than the stage's ``max_fill_run`` consecutive
images (default 2; an optional top-level key of the stage YAML) or it spans a round no camera
recorded; a video clip that would hold such a run moves past it when the scene has room:
pipeline/scenes/clipyield.py, which also tallies each bucket's yield.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Union

import numpy as np
import pyarrow as pa
import yaml

from pipeline.contract import cli, schema, storage
from pipeline.contract.manifest import QuarantineRecord, read_table, write_table
from pipeline.scenes.clipyield import MAX_FILL_RUN, BucketYield, SceneRules, YieldReport, attribute

STAGES_DIR = Path(__file__).resolve().parents[1] / "configs" / "stages"   # pipeline/configs/stages: package data, found installed too
FULL = "full"


@dataclass(frozen=True)
class BucketSpec:
    height: int
    width: int
    num_frames: Union[int, str]   # 1, 8k+1 or "full"
    batch_size: int
    stride: int | None = None     # clip start step in frames; None = non-overlapping

    @property
    def name(self) -> str:
        return schema.bucket_name(self.height, self.width, self.num_frames)


@dataclass(frozen=True)
class StageConfig:
    name: str
    buckets: list[BucketSpec]
    max_fill_run: int = MAX_FILL_RUN   # a clip's view may miss at most this many consecutive images (repaired)


def _bucket(d: dict, where: str) -> BucketSpec:
    unknown = set(d) - {"height", "width", "num_frames", "batch_size", "stride"}
    if unknown:
        raise cli.BadInput(f"{where}: unknown bucket keys {sorted(unknown)}")
    try:
        b = BucketSpec(int(d["height"]), int(d["width"]), d["num_frames"], int(d["batch_size"]),
                       None if d.get("stride") is None else int(d["stride"]))
    except KeyError as e:
        raise cli.BadInput(f"{where}: bucket {d} lacks {e}; need height, width, num_frames, batch_size") from None
    except (TypeError, ValueError) as e:
        raise cli.BadInput(f"{where}: bucket {d}: {e}; height, width, batch_size and stride are integers") from None
    t = b.num_frames
    if not (t == FULL or schema.valid_bucket_frames(t)):
        raise cli.BadInput(f"{where}: num_frames {t!r} must be 1, 8k+1 or 'full' (CogVAE frame rule)")
    m = schema.VAE_SPATIAL_COMPRESSION
    if b.height % m or b.width % m or b.height <= 0 or b.width <= 0:
        raise cli.BadInput(f"{where}: {b.height}x{b.width} must be positive multiples of {m} (the VAE's stride)")
    if b.batch_size < 1 or (b.stride is not None and b.stride < 1):
        raise cli.BadInput(f"{where}: batch_size and stride must be >= 1")
    return b


def stage_path(name_or_path: str) -> Path:
    """'demo' -> pipeline/configs/stages/demo.yaml (package data); anything with a '/' or '.yaml' is a path."""
    s = str(name_or_path)
    return Path(s) if ("/" in s or s.endswith((".yaml", ".yml"))) else STAGES_DIR / f"{s}.yaml"


def load_stage(name_or_path: str) -> StageConfig:
    """The stage config of `stage_path(name_or_path)`, checked."""
    path = stage_path(name_or_path)
    if not path.exists():
        known = sorted(p.stem for p in STAGES_DIR.glob("*.yaml"))
        raise cli.InputNotFound(f"stage config {path} not found; known stages: {known}")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise cli.BadInput(f"stage config {path} is not valid YAML: {cli.yaml_problem(e)}") from None
    if not isinstance(d, dict) or not isinstance(d.get("buckets"), list) or not d["buckets"]:
        raise cli.BadInput(f"{path}: expected a mapping with a non-empty 'buckets' list")
    buckets = [_bucket(b, f"{path} bucket {i}") for i, b in enumerate(d["buckets"])]
    names = [b.name for b in buckets]
    if len(set(names)) != len(names):
        raise cli.BadInput(f"{path}: duplicate buckets {names}")
    unknown = set(d) - {"name", "buckets", "max_fill_run"}
    if unknown:
        raise cli.BadInput(f"{path}: unknown keys {sorted(unknown)}; a stage has name, buckets, max_fill_run")
    run = d.get("max_fill_run", MAX_FILL_RUN)
    if not isinstance(run, int) or isinstance(run, bool) or run < 0:
        raise cli.BadInput(f"{path}: max_fill_run {run!r} must be an integer >= 0 (0: no repaired frames)")
    return StageConfig(name=str(d.get("name", path.stem)), buckets=buckets, max_fill_run=run)


def longest_valid_run(ok: np.ndarray) -> tuple[int, int]:
    """(start, length) of the longest run of True in (F,) ok (earliest on ties)."""
    best, start = (0, 0), None
    for i, v in enumerate(list(ok) + [False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            if i - start > best[1]:
                best = (start, i - start)
            start = None
    return best


def clip_starts(num_frames: int, keyframe: np.ndarray, t: int, stride: int | None) -> np.ndarray:
    """Candidate starts of T-frame clips: keyframes for T=1, else every stride (default T) frames."""
    if t == 1:
        return np.nonzero(keyframe)[0]
    return np.arange(0, max(num_frames - t + 1, 0), stride or t)


CLIP_SCHEMA = pa.schema([
    ("key", pa.string()), ("split", pa.string()), ("dataset", pa.string()), ("scene_name", pa.string()),
    ("scene_token", pa.string()), ("start", pa.int32()), ("num_frames", pa.int32()), ("height", pa.int32()),
    ("width", pa.int32()), ("bucket", pa.string()), ("middle_frame", pa.int32()),
    ("frames", pa.list_(pa.list_(pa.string()))), ("middle_frame_paths", pa.list_(pa.string())),
])


def make_clip_index(scenes: Iterable, stage: StageConfig, quarantine: list[QuarantineRecord] | None = None,
                    report: YieldReport | None = None) -> pa.Table:
    """Clips of every bucket of ``stage`` from SceneArrays (whole scenes; heavy arrays not needed).

    Clips the rules of pipeline/scenes/clipyield.py reject are skipped and appended to ``quarantine`` when
    given; ``report`` tallies each bucket's possible, kept, repaired and lost clips."""
    rows, seen = [], set()
    report = report if report is not None else YieldReport()
    report.max_fill_run = stage.max_fill_run

    def lose(b: BucketSpec, item: str, reason: str, detail: str, n: int = 1) -> None:
        report.lose(b.name, reason, n)
        if quarantine is not None:
            quarantine.append(QuarantineRecord("scenes", item, reason, detail))

    for sc in scenes:
        f = sc.num_frames
        rules = SceneRules(sc, stage.max_fill_run)
        w0, h0 = sc.image_size
        for b in stage.buckets:
            tally: BucketYield = report.bucket(b.name)
            full = b.num_frames == FULL
            starts = [] if full else [int(s) for s in clip_starts(f, sc.keyframe, int(b.num_frames), b.stride)]
            possible = int(f >= 9) if full else len(starts)
            tally.possible += possible
            if int(round(h0 * b.width / w0)) < b.height:
                lose(b, f"{sc.scene_name}/{b.name}", "image_too_small", f"{w0}x{h0} images resized to width "
                     f"{b.width} have fewer than {b.height} rows ({possible} clips)", possible)
                continue
            if full:
                s0, n = rules.longest_usable()
                t = (n - 1) // 8 * 8 + 1 if n >= 1 else 0
                if t < 9:  # a "full" clip shorter than 9 frames is no video
                    why = rules.verdict(0, f)
                    if possible and why:
                        lose(b, f"{sc.scene_name}/{b.name}", why[0], f"no 9 usable frames in a row: {why[1]}")
                    continue
                spans = [(s0, t)]
            elif int(b.num_frames) == 1:
                spans = [(s, 1) for s in starts]        # images: the keyframes, none of them ever moves
            else:
                t = int(b.num_frames)
                placed, rejected = rules.place(f, t, b.stride or t)
                spans = [(s, t) for s in placed]
                tally.moved += len(set(placed) - set(starts))
                for s, reason, detail in rejected:   # every window the rules refused (some clips moved past it)
                    if quarantine is not None:
                        quarantine.append(QuarantineRecord("scenes", schema.sample_key(sc.scene_name, s, t, b.height,
                                                                                       b.width), reason, detail))
                for reason, n in attribute(possible - len(placed), [r for _, r, _ in rejected]).items():
                    report.lose(b.name, reason, n)
            for s, t in spans:
                key = schema.sample_key(sc.scene_name, s, t, b.height, b.width)
                if key in seen:  # a "full" clip equal to a fixed-T clip of the same size
                    report.lose(b.name, "same_as_fixed_bucket")
                    continue
                why = rules.verdict(s, t)
                if why:
                    lose(b, key, *why)
                    continue
                seen.add(key)
                tally.kept += 1
                filled = rules.repaired(s, t)
                tally.repaired += bool(filled)
                tally.filled += filled
                mid = s + t // 2
                rows.append({"key": key, "split": sc.split, "dataset": sc.dataset, "scene_name": sc.scene_name,
                             "scene_token": sc.scene_token, "start": s, "num_frames": t, "height": b.height,
                             "width": b.width, "bucket": b.name, "middle_frame": mid,
                             "frames": [list(map(str, r)) for r in sc.frame_paths[s:s + t]],
                             "middle_frame_paths": list(map(str, sc.frame_paths[mid]))})
    rows.sort(key=lambda r: r["key"])
    return pa.Table.from_pylist(rows, schema=CLIP_SCHEMA)


def clip_counts(table: pa.Table) -> dict[str, int]:
    buckets = table.column("bucket").to_pylist()
    return {b: buckets.count(b) for b in sorted(set(buckets))}


def write_clip_index(table: pa.Table, out: str) -> str:
    uri = storage.join(out, schema.CLIP_INDEX_FILE)
    write_table(uri, table)
    return uri


def read_clip_index(out: str) -> pa.Table:
    uri = storage.join(out, schema.CLIP_INDEX_FILE)
    if not storage.exists(uri):
        raise FileNotFoundError(f"no clip index at {uri}: run `python -m pipeline.scenes.run --out {out}` first")
    return read_table(uri)
