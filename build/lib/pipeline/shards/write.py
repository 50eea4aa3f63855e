"""Shards: deterministic assignment before encoding, atomic writes, manifests, dataset card.

A shard is the unit of work of the write stage. Clips are assigned to shards from the
clip index alone (sorted keys, ``samples_per_shard`` per (split, bucket)), before any
frame is decoded, so the same inputs and config always produce the same shard paths and
contents, whatever the number of workers or the order they finish in. A clip that fails
later (corrupt frame, non-finite latents) leaves a hole in its shard and a row in
quarantine.parquet; its neighbours do not move.
"""
from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from pipeline.contract import schema, storage
from pipeline.contract.manifest import ShardRecord
from pipeline.contract.shardio import sha256_bytes, tar_bytes


@dataclass(frozen=True)
class ClipRef:
    key: str
    split: str
    scene_name: str
    start: int
    num_frames: int
    height: int
    width: int


@dataclass
class ShardPlan:
    split: str
    height: int
    width: int
    num_frames: int
    index: int
    clips: list[ClipRef] = field(default_factory=list)

    @property
    def bucket(self) -> str:
        return schema.bucket_name(self.height, self.width, self.num_frames)

    @property
    def path(self) -> str:
        return schema.shard_path(self.split, self.height, self.width, self.num_frames, self.index)

    @property
    def keys(self) -> list[str]:
        return [c.key for c in self.clips]


def plan_shards(clips: Iterable[ClipRef], samples_per_shard: int) -> list[ShardPlan]:
    """Group by (split, bucket), sort keys, cut every ``samples_per_shard``; plans sorted by path."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    groups: dict[tuple, list[ClipRef]] = defaultdict(list)
    for c in clips:
        groups[(c.split, c.height, c.width, c.num_frames)].append(c)
    plans = []
    for (split, h, w, t), members in sorted(groups.items()):
        members = sorted(members, key=lambda c: c.key)
        if len({c.key for c in members}) != len(members):
            raise ValueError(f"duplicate clip keys in bucket {split}/{schema.bucket_name(h, w, t)}")
        for i in range(0, len(members), samples_per_shard):
            plans.append(ShardPlan(split, h, w, t, i // samples_per_shard, members[i:i + samples_per_shard]))
    return sorted(plans, key=lambda p: p.path)


def config_hash(config: dict[str, Any]) -> str:
    """Hash of everything that changes shard bytes (stage, encoder, captions, schema): resume trusts only a match."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def write_shard(out: str, plan: ShardPlan, samples: list[tuple[str, dict[str, bytes]]], cfg_hash: str) -> ShardRecord:
    """Serialise samples (already encode_sample()'d, in plan order) and write the shard atomically."""
    data = tar_bytes(samples)
    storage.atomic_write(storage.join(out, plan.path), data)
    return ShardRecord(path=plan.path, split=plan.split, bucket=plan.bucket, height=plan.height, width=plan.width,
                       num_frames=plan.num_frames, samples=len(samples), bytes=len(data), sha256=sha256_bytes(data),
                       schema_version=schema.SCHEMA_VERSION, config_hash=cfg_hash, keys=[k for k, _ in samples])


def shard_is_complete(out: str, plan: ShardPlan, record: ShardRecord | None, cfg_hash: str,
                      verify: bool = False) -> bool:
    """True when the manifest row matches this plan and config and the object exists with its size
    (``verify``: also re-hash it, which reads every shard again)."""
    if record is None or record.config_hash != cfg_hash or record.path != plan.path:
        return False
    if not set(record.keys) <= set(plan.keys):
        return False
    uri = storage.join(out, plan.path)
    if not storage.exists(uri):
        return False
    if verify:
        data = storage.read_bytes(uri)
        return len(data) == record.bytes and sha256_bytes(data) == record.sha256
    fs, path = storage.filesystem(uri)
    return fs.size(path) == record.bytes


def dataset_card(out: str, records: list[ShardRecord], quarantined: int, info: dict[str, Any]) -> str:
    """README.md (Hugging Face card) and info.json next to the shards: pipeline/shards/card.py."""
    from pipeline.shards.card import write_card
    return write_card(out, records, quarantined, info)


@dataclass
class ShardInputs:
    """Everything a shard writer needs besides the latents (small; shipped with the task)."""
    plan: ShardPlan
    out: str
    store_uris: dict[str, str]                  # scene_name -> scene store URI
    captions: dict[str, tuple[str, dict]]       # key -> (text, meta.json caption)
    unit_of: dict[str, str]                     # key -> encode unit uid
    vae: dict[str, Any]                         # meta.json vae block
    store_std: bool
    cfg_hash: str


def make_shard(inp: ShardInputs, results: dict[str, dict]):
    """Assemble, validate and write one shard from encoded units; returns (ShardRecord, [QuarantineRecord]).

    ``results``: uid -> {"mean", "std", "bad_frames"} from pipeline.shards.encode.encode_units. A clip whose own
    frames include a bad one, whose latents are not finite, or that breaks the contract is quarantined;
    the rest of the shard is written."""
    from pipeline.shards.clips import assemble_sample
    from pipeline.shards.encode import non_finite
    from pipeline.contract.manifest import QuarantineRecord
    from pipeline.scenes.scenestore import open_scene_store

    samples, quarantine = [], []
    stores = {}  # one read per scene and shard: the union of its clips' frame ranges
    for name in sorted({c.scene_name for c in inp.plan.clips}):
        cs = [c for c in inp.plan.clips if c.scene_name == name]
        stores[name] = open_scene_store(inp.store_uris[name], frames=slice(min(c.start for c in cs),
                                                                           max(c.start + c.num_frames for c in cs)))
    for c in inp.plan.clips:
        res = results[inp.unit_of[c.key]]
        tl = schema.latent_frames(c.num_frames)
        try:
            sa = stores[c.scene_name]
            lo = c.start - sa.frame_start
            own = {p for row in sa.frame_paths[lo:lo + c.num_frames] for p in row}
            bad = sorted(p for p in res["bad_frames"] if p in own)
            if bad:
                quarantine.append(QuarantineRecord("frames", c.key, "bad_frame",
                                                   f"{bad[0]}: {res['bad_frames'][bad[0]]}"
                                                   + (f" (+{len(bad) - 1} more)" if len(bad) > 1 else "")))
                continue
            mean = np.ascontiguousarray(res["mean"][:, :, :tl])   # (V, 16, T', H/8, W/8) float16
            std = np.ascontiguousarray(res["std"][:, :, :tl]) if inp.store_std else None
            nf = non_finite(mean) + (non_finite(std) if std is not None else 0)
            if nf:
                quarantine.append(QuarantineRecord("encode", c.key, "non_finite_latents",
                                                   f"{nf} NaN/Inf values in the VAE posterior (mean/std); "
                                                   "check the input frames and use bf16, not fp16, on GPU"))
                continue
            text, cap_meta = inp.captions[c.key]
            d = assemble_sample(sa, c.start, c.num_frames, c.height, c.width, mean, std, text, cap_meta, inp.vae,
                                split=c.split)
            samples.append((c.key, schema.encode_sample(d)))
        except schema.SchemaError as e:
            quarantine.append(QuarantineRecord("write", c.key, "schema_error", str(e)))
    record = write_shard(inp.out, inp.plan, samples, inp.cfg_hash)
    return record, quarantine
