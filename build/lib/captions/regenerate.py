"""Re-caption existing shards (a new prompt version or model) without re-encoding anything.

For every shard of every split's manifest: caption each sample's middle frame (the row
``frames[(T-1)//2]`` of meta.json, paths relative to ``dataroot``), then rewrite only
``caption.txt`` and ``meta.json["caption"]`` of each sample; every other member is
copied byte for byte, and pipeline/shardio.tar_bytes fixes member order and tar headers,
so the rest of the tar is unchanged too. Each shard is replaced atomically and its
manifest row (bytes, sha256) is written right after it: a crash leaves at worst one
shard newer than its manifest row, which the next run repairs. No VAE, no GPU.

A sample whose caption fails keeps its old caption (quarantined, stage "captions"). A
shard whose bytes do not match its manifest sha256 is not touched (quarantined).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from tqdm import tqdm

from captions.config import CaptionConfig, CaptionConfigError
from captions.engine import CaptionItem, CaptionResult, run_captions
from captions.images import View
from captions.table import write_quarantine_file
from pipeline.contract import schema, storage
from pipeline.contract.cli import InputNotFound
from pipeline.contract.manifest import QuarantineRecord, read_manifest, write_manifest
from pipeline.contract.shardio import iter_shard, sha256_bytes, tar_bytes
from pipeline.shards.card import caption_sources, refresh_card


@dataclass
class RegenResult:
    captions: CaptionResult
    shards: int = 0
    shards_rewritten: int = 0
    samples: int = 0
    samples_updated: int = 0
    quarantine: list[QuarantineRecord] = field(default_factory=list)

    def summary(self) -> str:
        return (f"regenerate: {self.shards_rewritten}/{self.shards} shards rewritten, "
                f"{self.samples_updated}/{self.samples} samples re-captioned, {len(self.quarantine)} quarantined; "
                + self.captions.summary())


def find_splits(out: str) -> list[str]:
    tail = schema.manifest_path("x")[1:]  # "/manifest.parquet"
    return sorted(uri[: -len(tail)].replace("\\", "/").rsplit("/", 1)[-1]
                  for uri in storage.glob(storage.join(out, "*", tail.lstrip("/"))))


def middle_row(meta: dict) -> list[tuple[str, str]]:
    """(view, path) of the clip's middle frame: row (T-1)//2 of meta.json 'frames'."""
    frames = meta["frames"]
    return list(zip(meta["views"], frames[(len(frames) - 1) // 2]))


def _load(row: list[tuple[str, str]], dataroot: str) -> list[View]:
    return [View(label, storage.read_bytes(storage.join(dataroot, p))) for label, p in row]


def recaption_shards(out: str, cfg: CaptionConfig, dataroot: str | None, splits: list[str] | None = None,
                     progress: bool = True) -> RegenResult:
    """Re-caption every shard under ``out`` listed in ``{out}/{split}/manifest.parquet``."""
    if cfg.mode == "mllm":
        cfg.require_endpoint()
    if cfg.mode in ("mllm", "dataset") and not dataroot:
        raise CaptionConfigError(f"caption mode {cfg.mode!r} reads the source images / scene tables: pass "
                                 f"--dataroot (the folder that meta.json 'frames' paths are relative to)")
    splits = splits or find_splits(out)
    if not splits:
        raise InputNotFound(f"no {schema.manifest_path('<split>')} under {out}: is it a build output folder?")
    quarantine: list[QuarantineRecord] = []
    manifests = {s: read_manifest(out, s) for s in splits}
    bad_shards: set[str] = set()

    # pass 1: read every sample's meta.json; verify each shard against its manifest row
    items: list[CaptionItem] = []
    for split, records in manifests.items():
        for rec in tqdm(records, desc=f"scan {split}", disable=not progress, leave=False):
            data = storage.read_bytes(storage.join(out, rec.path))
            if sha256_bytes(data) != rec.sha256:
                bad_shards.add(rec.path)
                quarantine.append(QuarantineRecord("captions", rec.path, "sha256_mismatch",
                                                   "shard bytes differ from its manifest row; not rewritten"))
                continue
            for key, members in iter_shard(data):
                meta = json.loads(members["meta.json"])
                # keep only the middle row: full T x V frame lists of every sample would not fit in memory
                items.append(CaptionItem(key, (lambda r=middle_row(meta): _load(r, dataroot or "")),
                                         meta.get("scene_name", ""), meta.get("scene_token", "")))

    descriptions = None
    if cfg.mode == "dataset":
        from captions.stage import read_scene_descriptions
        descriptions = read_scene_descriptions(dataroot or "")
    caps = run_captions(items, cfg, storage.join(out, schema.CAPTIONS_FILE), descriptions, progress)
    res = RegenResult(captions=caps, samples=len(items), quarantine=quarantine + caps.quarantine)

    # pass 2: rewrite caption members shard by shard
    metas: list[dict] = []  # every sample's caption block after the rewrite: the card says the real sources
    for split, records in manifests.items():
        for i, rec in enumerate(tqdm(records, desc=f"rewrite {split}", disable=not progress)):
            res.shards += 1
            if rec.path in bad_shards:
                continue
            uri = storage.join(out, rec.path)
            data = storage.read_bytes(uri)
            samples, updated, before, after = [], 0, [], []
            try:
                for key, members in iter_shard(data):
                    meta = json.loads(members["meta.json"])
                    before.append({"caption": meta.get("caption")})  # not the whole meta: T x V paths each
                    if key in caps.captions:
                        text, cmeta = caps.captions[key]
                        meta["caption"] = {**meta.get("caption", {}), **cmeta}
                        members = dict(members, **{"meta.json": schema.meta_bytes(meta),
                                                   "caption.txt": text.encode("utf-8")})
                        schema.decode_sample(members, key)  # the rewritten sample still obeys the contract
                        updated += 1
                    after.append({"caption": meta.get("caption")})
                    samples.append((key, members))
            except schema.SchemaError as e:
                res.quarantine.append(QuarantineRecord("captions", rec.path, "schema_error", str(e)[:500]))
                metas += before  # the shard keeps its old captions
                continue
            metas += after
            new = tar_bytes(samples)
            res.samples_updated += updated
            if new == data:
                continue
            storage.atomic_write(uri, new)
            records[i] = type(rec)(**{**rec.__dict__, "bytes": len(new), "sha256": sha256_bytes(new)})
            write_manifest(out, split, records)
            res.shards_rewritten += 1
    write_quarantine_file(storage.join(out, schema.QUARANTINE_FILE), res.quarantine,
                          replace_items={it.key for it in items} | {r.path for rs in manifests.values() for r in rs})
    refresh_card(out, captions=caption_sources(metas))
    return res  # mdv2-caption shards prints res.summary() once
