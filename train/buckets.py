"""Buckets and the bucket schedule (paper Appendix B).

A bucket is one (H, W, T) clip shape; every batch holds one bucket so the batch axis
aligns, and each bucket has its own batch size (set by the stage config so that every
bucket's iteration takes about the same time). The schedule says which bucket step
``s`` trains on. It is a pure function of (seed, rank, step): resuming at step N
needs no iterator state, and the number of samples any stream has consumed up to
step N can be recomputed from the schedule alone.

Weights: ``balanced`` gives every bucket the same share of batches, so rare buckets
(few long clips) are repeated within an epoch, as the paper does in stage 3;
``proportional`` follows the data (samples / batch size); a mapping gives explicit
weights per bucket name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from pipeline.contract import cli, schema
from pipeline.scenes.buckets import FULL, load_stage  # FULL: a stage's "longest clip of each scene" bucket

BUCKET_RE = re.compile(r"(\d+)x(\d+)_t(\d+|full)")


@dataclass(frozen=True)
class Bucket:
    height: int
    width: int
    num_frames: int | str   # 1, 8k+1 or "full"
    batch_size: int

    @property
    def name(self) -> str:
        return schema.bucket_name(self.height, self.width, self.num_frames)


def stage_specs(stage: str) -> list[dict]:
    """The bucket specs of a stage (name under pipeline/configs/stages/ or a YAML path), read by the
    pipeline's own reader so that build and trainer agree on every bucket and batch size."""
    return [dict(height=b.height, width=b.width, num_frames=b.num_frames, batch_size=b.batch_size)
            for b in load_stage(stage).buckets]


def bucket_of_url(url: str) -> tuple[int, int, int | str]:
    """(H, W, T or "full") from a shard URL's ``{H}x{W}_t{T}`` folder (schema.BUCKET_TEMPLATE)."""
    hits = BUCKET_RE.findall(url)
    if not hits:
        raise cli.BadInput(f"cannot tell the bucket of shard {url!r}: shards must live in a folder named like "
                           f"{schema.BUCKET_TEMPLATE!r} (e.g. 224x400_t17), as pipeline/build.py writes them")
    h, w, t = hits[-1]
    return int(h), int(w), (t if t == FULL else int(t))


def bucket_sort_key(shape: tuple) -> tuple:
    h, w, t = shape
    return (h, w, 1 << 30 if t == FULL else t)


def match_buckets(specs: Sequence[Mapping], shapes: Sequence[tuple]) -> dict[tuple, Bucket]:
    """Assign each (H, W, T) found in the shards the batch size of its stage spec (same order as sorted shapes)."""
    sizes = {(int(s["height"]), int(s["width"]), s["num_frames"] if s["num_frames"] == FULL else int(s["num_frames"])):
             int(s["batch_size"]) for s in specs}
    return {shape: Bucket(*shape, batch_size=sizes[shape])
            for shape in sorted(set(shapes), key=bucket_sort_key) if shape in sizes}


def schedule_weights(buckets: Sequence[Bucket], mode: str | Mapping[str, float] = "balanced",
                     samples: Mapping[str, int] | None = None) -> np.ndarray:
    """Probability of each bucket per step (sums to 1)."""
    if isinstance(mode, Mapping):
        missing = [b.name for b in buckets if b.name not in mode]
        if missing:
            raise cli.BadInput(f"bucket_weights lacks {missing}; give a weight for every bucket")
        w = np.array([float(mode[b.name]) for b in buckets])
    elif mode == "balanced":
        w = np.ones(len(buckets))
    elif mode == "proportional":
        if samples is None or any(b.name not in samples for b in buckets):
            raise cli.BadInput("schedule 'proportional' needs per-bucket sample counts from a manifest "
                               "(data.root with manifest.parquet); use 'balanced' for bare URLs")
        w = np.array([samples[b.name] / b.batch_size for b in buckets], dtype=float)
    else:
        raise cli.BadInput(f"unknown schedule {mode!r}: use 'balanced', 'proportional' or a {{bucket: weight}} map")
    if (w < 0).any() or w.sum() <= 0:
        raise cli.BadInput(f"bucket weights must be >= 0 with a positive sum, got {w.tolist()}")
    return w / w.sum()


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a counter-based hash, so bucket(step) needs no sequential RNG state."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x


def step_uniform(seed: int, rank: int, steps: np.ndarray) -> np.ndarray:
    """A uniform in [0, 1) per step, a pure function of (seed, rank, step)."""
    with np.errstate(over="ignore"):
        base = _mix64(np.array([seed * 1_000_003 + rank * 7919 + 0x9E3779B97F4A7C15], dtype=np.uint64))
        h = _mix64(np.asarray(steps, dtype=np.uint64) + base)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def bucket_indices(weights: np.ndarray, seed: int, rank: int, steps: np.ndarray) -> np.ndarray:
    """Bucket index per step (vectorised)."""
    cdf = np.cumsum(weights)
    cdf[-1] = 1.0
    return np.searchsorted(cdf, step_uniform(seed, rank, steps), side="right").astype(np.int64)
