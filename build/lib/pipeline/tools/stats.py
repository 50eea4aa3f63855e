"""Dataset statistics of a build output: what the manifests promise and what the samples hold.

    python -m pipeline.tools.stats OUT                 # local folder or s3://bucket/prefix
    -> OUT/stats.md (markdown tables), OUT/stats.png (charts), OUT/stats.json (the numbers)

Per split and bucket: shards, samples, hours of video (a clip of T frames at 12 fps lasts
T / 12 s; the six views of a clip count once). Over the samples: class histogram (objects =
tracks per clip, and box-frames), objects per frame, caption length in words and caption
source, and per view the schema-2.0 time model (pipeline/tools/viewstats.py: visible boxes, exposure
offsets from CAM_FRONT, view_boxes' displacement from the reference boxes). Only the small
members (meta, boxes and their masks and classes, caption) are parsed; the latents are skipped. Shards are read in manifest order, so the numbers are deterministic.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from pipeline.contract import cli, manifest, schema, storage
from pipeline.contract.shardio import sha256_bytes
from pipeline.contract.tarscan import read_shard
from pipeline.shards.card import refresh_card
from pipeline.tools.viewstats import ViewStats

STATS_MD, STATS_PNG, STATS_JSON = "stats.md", "stats.png", "stats.json"  # relative to the output root
OBJECTS_PER_FRAME_BINS = (0, 1, 2, 5, 10, 20, 50, 100)


@dataclass
class StatsConfig:
    out: str                           # build output root (local or URI)
    report_dir: str | None = None      # where stats.{md,png,json} go (default: out)
    max_shards: int | None = None      # per split: read only the first N shards' samples (manifest numbers stay full)
    progress: bool = True


@dataclass
class BucketStats:
    split: str
    bucket: str
    num_frames: int
    shards: int = 0
    samples: int = 0
    bytes: int = 0

    @property
    def hours(self) -> float:
        return self.samples * self.num_frames / schema.FPS / 3600.0


@dataclass
class SampleStats:
    samples: int = 0
    frames: int = 0
    class_objects: Counter = field(default_factory=Counter)       # class -> tracks
    class_box_frames: Counter = field(default_factory=Counter)    # class -> (frame, object) pairs
    objects_per_frame: Counter = field(default_factory=Counter)   # count -> frames with that many objects
    caption_words: list[int] = field(default_factory=list)
    caption_source: Counter = field(default_factory=Counter)
    views: ViewStats = field(default_factory=ViewStats)

    def add(self, members: dict[str, bytes], key: str) -> None:
        meta = json.loads(members["meta.json"])
        mask = schema.npy_load(members["box_mask.npy"], "box_mask.npy", key)      # (T, N) bool
        cls = schema.npy_load(members["box_class.npy"], "box_class.npy", key)     # (N,) int8
        if mask.ndim != 2 or cls.shape != (mask.shape[1],):
            raise schema.SchemaError("box_mask.npy", f"shape {mask.shape} does not match box_class {cls.shape}", key)
        self.samples += 1
        self.frames += mask.shape[0]
        present = mask.any(0)
        for c, n in zip(*np.unique(cls[present], return_counts=True)):
            self.class_objects[schema.OBJECT_CLASSES[int(c)]] += int(n)
        for c, n in zip(*np.unique(np.broadcast_to(cls, mask.shape)[mask], return_counts=True)):
            self.class_box_frames[schema.OBJECT_CLASSES[int(c)]] += int(n)
        self.objects_per_frame.update(int(x) for x in mask.sum(1))
        self.caption_words.append(len(members.get("caption.txt", b"").decode("utf-8").split()))
        self.caption_source[str(meta.get("caption", {}).get("source"))] += 1
        self.views.add(meta, members, mask, key)


@dataclass
class DatasetStats:
    buckets: list[BucketStats]
    samples: SampleStats
    splits: list[str]
    mismatches: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        s = self.samples
        opf = np.repeat(list(s.objects_per_frame), list(s.objects_per_frame.values())) if s.objects_per_frame else np.zeros(0)
        words = np.asarray(s.caption_words)
        return {
            "buckets": [dict(split=b.split, bucket=b.bucket, shards=b.shards, samples=b.samples, bytes=b.bytes,
                             hours=round(b.hours, 6)) for b in self.buckets],
            "samples_read": s.samples, "frames_read": s.frames,
            "class_objects": dict(sorted(s.class_objects.items())),
            "class_box_frames": dict(sorted(s.class_box_frames.items())),
            "objects_per_frame": {"mean": _r(opf.mean()) if opf.size else 0.0,
                                  "median": _r(np.median(opf)) if opf.size else 0.0,
                                  "max": int(opf.max()) if opf.size else 0,
                                  "histogram": {str(k): v for k, v in sorted(s.objects_per_frame.items())}},
            "caption_words": {"mean": _r(words.mean()) if words.size else 0.0,
                              "median": _r(np.median(words)) if words.size else 0.0,
                              "max": int(words.max()) if words.size else 0},
            "caption_source": dict(sorted(s.caption_source.items())),
            "views": s.views.to_json(),
            "mismatches": self.mismatches,
        }


def _r(x: float) -> float:
    return round(float(x), 3)


def splits_of(out: str) -> list[str]:
    """Splits that have a manifest under `out`."""
    pattern = storage.join(out, schema.manifest_path("*"))
    return sorted(u.replace("\\", "/").rstrip("/").split("/")[-2] for u in storage.glob(pattern))


def collect(cfg: StatsConfig) -> DatasetStats:
    splits = splits_of(cfg.out)
    if not splits:
        raise cli.InputNotFound(f"{cfg.out}: no {schema.manifest_path('<split>')} found; is this a build output "
                                f"root (the --out of pipeline/build.py)?")
    per_bucket: dict[tuple[str, str], BucketStats] = {}
    samples = SampleStats()
    mismatches: list[str] = []
    todo = []
    for split in splits:
        records = manifest.read_manifest(cfg.out, split)
        for r in records:
            b = per_bucket.setdefault((split, r.bucket), BucketStats(split, r.bucket, r.num_frames))
            b.shards += 1
            b.samples += r.samples
            b.bytes += r.bytes
        todo += [(split, r) for r in records[:cfg.max_shards]]
    for split, r in tqdm(todo, desc="shards", unit="shard", disable=not cfg.progress):
        data = storage.read_bytes(storage.join(cfg.out, r.path))
        got, report = read_shard(data, r.path)   # the loader's reader: intact samples of a damaged shard count
        for s in got:
            samples.add(s, s["__key__"])
        if report.damage:
            mismatches.append(f"{r.path}: damaged, {len(report.damaged_keys)} samples dropped "
                              f"{report.damaged_keys[:3]}: {report.damage[0].reason}")
        elif sha256_bytes(data) != r.sha256:   # flipped payload bytes keep the tar valid: the hash sees them
            mismatches.append(f"{r.path}: sha256 differs from the manifest's (bytes changed since the build)")
        if len(got) != r.samples:
            mismatches.append(f"{r.path}: manifest says {r.samples} samples, shard holds {len(got)}")
    return DatasetStats(sorted(per_bucket.values(), key=lambda b: (b.split, b.bucket)), samples, splits, mismatches)


def markdown(st: DatasetStats) -> str:
    j = st.to_json()
    lines = ["# Dataset statistics", "", "## Samples and hours of video per split and bucket", "",
             "| split | bucket | shards | samples | hours | GiB |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for b in st.buckets:
        lines.append(f"| {b.split} | {b.bucket} | {b.shards} | {b.samples} | {b.hours:.4f} | {b.bytes / 2**30:.3f} |")
    for split in st.splits:
        bs = [b for b in st.buckets if b.split == split]
        lines.append(f"| **{split}** | all | {sum(b.shards for b in bs)} | {sum(b.samples for b in bs)} | "
                     f"{sum(b.hours for b in bs):.4f} | {sum(b.bytes for b in bs) / 2**30:.3f} |")
    lines += ["", f"Samples read: {j['samples_read']} ({j['frames_read']} frames).", "",
              "## Classes", "", "| class | objects (tracks) | box-frames |", "| --- | ---: | ---: |"]
    for c in schema.OBJECT_CLASSES:
        lines.append(f"| {c} | {j['class_objects'].get(c, 0)} | {j['class_box_frames'].get(c, 0)} |")
    o, w = j["objects_per_frame"], j["caption_words"]
    lines += ["", "## Objects per frame", "", f"mean {o['mean']}, median {o['median']}, max {o['max']}", "",
              "| objects | frames |", "| ---: | ---: |"]
    lines += [f"| {k} | {v} |" for k, v in o["histogram"].items()]
    lines += ["", "## Captions", "", f"words per caption: mean {w['mean']}, median {w['median']}, max {w['max']}", "",
              "| source | samples |", "| --- | ---: |"]
    lines += [f"| {k} | {v} |" for k, v in j["caption_source"].items()]
    lines += [""] + st.samples.views.markdown()
    if st.mismatches:
        lines += ["", "## Manifest mismatches", ""] + [f"- {m}" for m in st.mismatches]
    return "\n".join(lines) + "\n"


def chart_png(st: DatasetStats) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = st.samples
    fig, ax = plt.subplots(2, 2, figsize=(12, 8), dpi=80)
    names = [f"{b.split}\n{b.bucket}" for b in st.buckets]
    ax[0, 0].bar(range(len(names)), [b.hours for b in st.buckets], color="#4477aa")
    ax[0, 0].set_xticks(range(len(names)), names, fontsize=7, rotation=30)
    ax[0, 0].set_title("hours of video per split / bucket")
    ax[0, 1].barh(list(schema.OBJECT_CLASSES), [s.class_objects.get(c, 0) for c in schema.OBJECT_CLASSES],
                  color="#ee6677")
    ax[0, 1].set_title("objects (tracks) per class")
    ks = sorted(s.objects_per_frame)
    ax[1, 0].bar(ks, [s.objects_per_frame[k] for k in ks], color="#228833")
    ax[1, 0].set_title("objects per frame"), ax[1, 0].set_xlabel("objects"), ax[1, 0].set_ylabel("frames")
    ax[1, 1].hist(s.caption_words, bins=min(30, max(1, len(set(s.caption_words)))), color="#ccbb44")
    ax[1, 1].set_title("caption length"), ax[1, 1].set_xlabel("words"), ax[1, 1].set_ylabel("samples")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version string: same stats, same bytes
    plt.close(fig)
    return buf.getvalue()


def write_report(cfg: StatsConfig, st: DatasetStats) -> dict[str, str]:
    base = cfg.report_dir or cfg.out
    md = markdown(st) + f"\n![charts]({STATS_PNG})\n"
    paths = {"md": storage.join(base, STATS_MD), "png": storage.join(base, STATS_PNG),
             "json": storage.join(base, STATS_JSON)}
    storage.atomic_write(paths["md"], md.encode())
    storage.atomic_write(paths["png"], chart_png(st))
    storage.atomic_write(paths["json"], json.dumps(st.to_json(), indent=1, sort_keys=True).encode())
    return paths


@cli.entry(user_errors=(schema.SchemaError,))  # a shard that breaks the contract is bad input here
def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="mdv2-stats", description=__doc__.split("\n\n", 1)[0],
                           epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="build output root (local folder or s3://…): reads OUT/<split>/manifest.parquet and shards")
    p.add_argument("--report-dir", help="write stats.md/png/json here instead of OUT")
    p.add_argument("--max-shards", type=int, help="per split, read the samples of the first N shards only (quick look)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    cfg = StatsConfig(a.out, a.report_dir, a.max_shards, not a.no_progress)
    st = collect(cfg)
    print(markdown(st))
    paths = write_report(cfg, st)
    if cfg.report_dir is None:  # the card beside the shards points at stats.md and quotes its numbers
        j = st.to_json()
        refresh_card(cfg.out, stats={k: j[k] for k in ("samples_read", "class_objects", "objects_per_frame",
                                                       "caption_words", "caption_source")})
    print(f"written: {paths['md']}, {paths['png']}, {paths['json']}")
    return 1 if st.mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
