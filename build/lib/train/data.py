"""Stream training batches from webdataset shards: one bucket per batch, deterministic by step.

Where shards come from: ``data.shards`` URL patterns (local globs, ``{000..009}`` brace
ranges, ``pipe:`` commands, ``s3://``/``gs://`` through fsspec) or ``data.root``, the
pipeline's output (its ``{split}/manifest.parquet`` lists the shards and their schema
version; without a manifest the ``{split}/{H}x{W}_t{T}/shard-*.tar`` folders are globbed).
A shard's bucket is its ``{H}x{W}_t{T}`` folder; its batch size comes from the stage config.

Determinism (why resume is exact): the bucket of step s is a hash of (seed, rank, s)
(train/buckets.py). Each (rank, stream, bucket) reads an endless sequence of *chunks*;
chunk k reads the shards in a random order, cycled (so epochs never end, and a chunk reads a shard
twice only when it needs more shards than there are), and shuffles samples with RNGs seeded by
(seed, rank, stream, bucket, k). How many samples a stream has
consumed before step N follows from the schedule alone, so a resumed run re-opens the
right chunk and skips the samples already used (reading, not decoding, them).

Failure policy: damage costs only what it touches. A shard that cannot be opened is skipped; a
damaged one (truncated, a bad header, a member whose size lies, train/tario.py + pipeline/contract/
tarscan.py) gives every intact sample and drops the damaged ones; a sample that breaks the contract
is dropped. Each is a warning, counted per shard (``corrupt_shards``: shards, however often they
are re-read) and per sample (``bad_samples``). A bucket whose every shard gives nothing stops the run
(``no readable sample``); a shard of another schema *major* version stops it too (training on a
different contract would be silently wrong).
"""
from __future__ import annotations

import json
import logging
import random
import zlib
from dataclasses import dataclass
from typing import Iterator

import braceexpand
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.contract import manifest as manifest_mod
from pipeline.contract import cli, schema, storage
from train.buckets import (Bucket, bucket_indices, bucket_of_url, bucket_sort_key, match_buckets, schedule_weights,
                           stage_specs)
from train.config import DataConfig
from train.batch import Batch, collate, unpack_bev  # noqa: F401  (Batch, unpack_bev: re-exported)
from train.batchring import BatchRing, RingBatch, ring_batch
from pipeline.contract.tarscan import Damage
from train import signals, watchdog
from train.tario import tar_samples  # one read per shard, read ahead, members as views (no copies)

log = logging.getLogger("train.data")


class ShardVersionError(cli.UserError, RuntimeError):
    """Shards written under another schema major version; the trainer refuses them."""


# ---- URLs ---------------------------------------------------------------------------

def expand_urls(patterns: list[str] | str) -> list[str]:
    """Brace ranges expanded, globs listed (locally or through fsspec); ``pipe:`` URLs kept as given."""
    out: list[str] = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        for url in braceexpand.braceexpand(pattern):
            if url.startswith("pipe:") or not any(c in url for c in "*?["):
                out.append(url)
            else:
                hits = storage.glob(url)
                if not hits:
                    raise cli.InputNotFound(f"shard pattern {url!r} matches no file")
                out.extend(hits)
    return out


def open_url(url: str):
    """pipe: through webdataset's gopen; s3://, gs://, memory:// through fsspec; else a local file."""
    if url.startswith("pipe:"):
        return wds.gopen(url, "rb")
    if storage.is_remote(url):
        return storage.open_file(url, "rb")
    return open(url[len("file://"):] if url.startswith("file://") else url, "rb")


@dataclass
class ShardSet:
    """The shards of one split grouped by bucket, with batch sizes from the stage config."""
    buckets: list[Bucket]
    urls: dict[str, list[str]]                 # bucket name -> shard URLs
    samples: dict[str, int] | None = None      # bucket name -> sample count (from the manifest)


def find_shards(cfg: DataConfig, split: str, explicit: list[str]) -> ShardSet:
    samples = None
    if explicit:
        urls = expand_urls(explicit)
    elif cfg.root:
        records = manifest_mod.read_manifest(cfg.root, split)
        if records:
            bad = [r for r in records if schema.schema_major(r.schema_version) != schema.schema_major(schema.SCHEMA_VERSION)]
            if bad:
                raise ShardVersionError(
                    f"{storage.join(cfg.root, schema.manifest_path(split))}: {len(bad)} shards have schema version "
                    f"{bad[0].schema_version}, this trainer reads schema {schema.SCHEMA_VERSION} (major "
                    f"{schema.schema_major(schema.SCHEMA_VERSION)}); rebuild the shards with this pipeline version "
                    f"or use the trainer release that matches them")
            urls = [storage.join(cfg.root, r.path) for r in records]
            samples = {}
            for r in records:
                samples[r.bucket] = samples.get(r.bucket, 0) + r.samples
        else:
            pattern = storage.join(cfg.root, split, "*", "shard-*.tar")
            urls = storage.glob(pattern)
    else:
        raise cli.BadInput("no shards: set data.root (the pipeline's --out) or data.shards (URL patterns)")
    if not urls:
        raise cli.InputNotFound(f"no {split} shards found (root={cfg.root!r}, shards={explicit!r})")
    by_shape: dict[tuple, list[str]] = {}
    for u in urls:
        by_shape.setdefault(bucket_of_url(u), []).append(u)
    matched = match_buckets(stage_specs(cfg.stage), list(by_shape))
    ignored = sorted(schema.bucket_name(*s) for s in by_shape if s not in matched)
    if ignored:
        log.warning("stage %r has no batch size for buckets %s; their shards are not used", cfg.stage, ignored)
    if not matched:
        raise cli.BadInput(f"none of the {split} buckets {sorted(schema.bucket_name(*s) for s in by_shape)} is in "
                           f"stage config {cfg.stage!r}; train with the stage the shards were built for")
    buckets = [matched[s] for s in sorted(matched, key=bucket_sort_key)]
    return ShardSet(buckets, {b.name: sorted(by_shape[(b.height, b.width, b.num_frames)]) for b in buckets}, samples)


# ---- one sample ---------------------------------------------------------------------

@dataclass
class LoaderStats:
    corrupt_shards: int = 0   # distinct shards found damaged or unreadable (re-reads of one shard count once)
    bad_samples: int = 0      # distinct samples dropped: damaged in the tar, or breaking the contract
    samples: int = 0          # samples decoded
    bytes: int = 0            # raw member bytes read

    def __post_init__(self):
        self._shards: set[str] = set()
        self._samples: set[tuple[str, str]] = set()

    def shard_damaged(self, url: str) -> bool:
        """Count a damaged shard; True the first time it is seen."""
        new = url not in self._shards
        self._shards.add(url)
        self.corrupt_shards = len(self._shards)
        return new

    def sample_dropped(self, url: str | None, key: str | None) -> bool:
        new = (url or "", key or "") not in self._samples
        self._samples.add((url or "", key or ""))
        self.bad_samples = len(self._samples)
        return new

    def as_dict(self) -> dict:
        return dict(corrupt_shards=self.corrupt_shards, bad_samples=self.bad_samples,
                    samples=self.samples, bytes=self.bytes)


def decode(raw: dict) -> dict:
    """Raw webdataset sample -> arrays (validated by pipeline/contract/schema.py; BEV maps stay bit-packed).

    The posterior draw z = s * (mean + std * eps) is left to the trainer (Batch.sample_latents):
    float16 mean/std travel at half the bytes, and on a GPU the draw costs nothing.
    Raises ShardVersionError (fatal) for another schema major, SchemaError for a broken sample."""
    key, url = raw.get("__key__"), raw.get("__url__")
    meta_raw = raw.get("meta.json")
    if meta_raw is not None:
        try:
            version = json.loads(meta_raw).get("schema_version")
        except (ValueError, AttributeError):
            version = None  # decode_sample names the problem below
        if version is not None:
            try:
                schema.check_schema_version(version, key)
            except schema.SchemaError as e:
                raise ShardVersionError(f"shard {url}: {e}") from None
    s = schema.decode_sample({k: v for k, v in raw.items() if k not in ("__url__", "__local_path__")}, key)
    return dict(key=s.key, caption=s.caption, latent_mean=s.latent_mean, latent_std=s.latent_std,
                scaling_factor=float(s.meta["vae"]["scaling_factor"]),
                intrinsics=s.intrinsics, source_intrinsics=s.source_intrinsics, cam2lidar=s.cam2lidar,
                fill_mask=s.fill_mask, boxes=s.boxes, view_boxes=s.view_boxes,
                box_class=s.box_class, box_mask=s.box_mask, box_view_mask=s.box_view_mask, traj=s.traj,
                bev=s.bev, views=tuple(s.views), shape=(s.meta["height"], s.meta["width"], s.num_frames))


def _decoded(raw: dict) -> tuple[int, str | None, dict | Exception]:
    """(member bytes, shard URL, decoded sample or the exception that rejected it): decode() as a value,
    so the read-ahead thread can run it and the consumer decides, in stream order, what an error means."""
    nbytes = sum(len(v) for k, v in raw.items() if not k.startswith("__"))
    try:
        return nbytes, raw.get("__url__"), decode(raw)
    except Exception as e:  # noqa: BLE001  SchemaError is counted by the consumer, the rest re-raised there
        return nbytes, raw.get("__url__"), e


# ---- streams --------------------------------------------------------------------------

class BucketStream:
    """Endless, deterministic stream of decoded samples of one bucket for one (rank, stream)."""

    def __init__(self, urls: list[str], key: tuple[int, ...], cfg: DataConfig, stats: LoaderStats):
        self.urls, self.key, self.cfg, self.stats = urls, key, cfg, stats
        self.chunk, self.index, self._it = 0, 0, None

    def seek(self, consumed: int) -> None:
        self.chunk, skip = divmod(consumed, self.cfg.samples_per_chunk)
        self._it = self._chunk_iter(self.chunk)
        for _ in range(skip):  # decoded ahead like any sample, but no batch is assembled
            next(self._it)
        self.index = skip

    def _on_damage(self, d: Damage) -> None:
        """A damaged region, a dropped sample or an unreadable shard (pipeline/contract/tarscan.py), counted once
        per shard and per sample however often a chunk re-reads them; warned about the first time."""
        first = self.stats.shard_damaged(d.url)
        if d.dropped:
            if self.stats.sample_dropped(d.url, d.key):
                log.warning("skipping damaged sample %s (%d so far): %s", d.key, self.stats.bad_samples, d)
        elif first:
            log.warning("damaged or unreadable shard (%d so far): %s", self.stats.corrupt_shards, d)

    def _chunk_iter(self, chunk: int) -> Iterator[dict]:
        rng = np.random.default_rng((*self.key, chunk))
        bound = 2 * len(self.urls) + 10
        empty = {"reads": 0}

        def shard_draws():  # runs in the read-ahead thread (train/tario.py), after the shuffle seed is drawn
            while True:
                for i in rng.permutation(len(self.urls)):  # without replacement: no shard twice in a round
                    url = self.urls[int(i)]
                    try:
                        yield dict(url=url, stream=open_url(url))
                    except Exception as e:  # missing object, failing pipe: the decode thread counts it, in order
                        yield dict(url=url, error=e)

        def per_shard(samples: Iterator[dict]) -> list[tuple[int, str | None, dict | Exception]]:
            # the guard counts shard reads that gave no readable sample, in a row, in shard order (this runs in
            # the one decode thread): not draws, which the shuffle buffer and the read-ahead make while filling
            out = [_decoded(raw) for raw in samples]
            if any(not isinstance(o[2], Exception) for o in out):
                empty["reads"] = 0
            else:
                empty["reads"] += 1
                if empty["reads"] > bound:
                    raise RuntimeError(f"no readable sample in {empty['reads']} shard reads in a row of the "
                                       f"{len(self.urls)} shards {self.urls[:3]}{'...' if len(self.urls) > 3 else ''}"
                                       f": every one is damaged or unreadable (see the warnings above)")
            return out

        # samples leave the read-ahead thread decoded (or as the error that rejected them), in shard order
        samples = tar_samples(shard_draws(), self._on_damage, per_shard=per_shard, ahead=self.cfg.read_ahead_shards)
        shuffled = wds.filters._shuffle(samples, bufsize=self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer,
                                        rng=random.Random(int(rng.integers(2**62))))
        for n, sample in enumerate(shuffled):
            if n >= self.cfg.samples_per_chunk:
                return
            yield sample

    def __next__(self) -> dict:
        while True:
            if self._it is None:
                self.seek(0)
            try:
                raw = next(self._it)
            except StopIteration:
                self.chunk, self.index = self.chunk + 1, 0
                self._it = self._chunk_iter(self.chunk)
                continue
            self.index += 1
            nbytes, url, out = raw
            if isinstance(out, schema.SchemaError):
                if self.stats.sample_dropped(url, out.key):
                    log.warning("skipping bad sample (%d so far) from %s: %s", self.stats.bad_samples, url, out)
                continue
            if isinstance(out, Exception):  # ShardVersionError, or a bug: raised here, in the consumer
                raise out
            self.stats.samples += 1
            self.stats.bytes += nbytes
            return out


class BatchStream(IterableDataset):
    """Batches for steps start, start+1, ... of one rank; each DataLoader worker is one stream.

    Step s belongs to stream ``s % streams``, whatever step the run started at, so the
    stream contents do not depend on where a run was resumed."""

    def __init__(self, shards: ShardSet, cfg: DataConfig, seed: int, rank: int = 0, world: int = 1,
                 start_step: int = 0, stop_step: int | None = None):
        self.shards, self.cfg, self.seed, self.rank, self.world = shards, cfg, seed, rank, world
        self.start, self.stop = start_step, stop_step
        self.streams = max(1, cfg.num_workers)
        self.ring: BatchRing | None = None
        self.weights = schedule_weights(shards.buckets, cfg.schedule, shards.samples)

    def bucket_of_steps(self, steps: np.ndarray) -> np.ndarray:
        return bucket_indices(self.weights, self.seed, self.rank, steps)

    def _urls_for(self, urls: list[str], stream: int) -> list[str]:
        """Split shards by node, then by stream, when there are enough; else share them (seeds still differ)."""
        parts = self.world * self.streams
        if len(urls) >= parts:
            return urls[self.rank * self.streams + stream::parts]
        if len(urls) >= self.world:
            return urls[self.rank::self.world]
        return urls

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if workers != self.streams:
            raise RuntimeError(f"BatchStream built for {self.streams} streams but run with {workers} workers")
        stream = (self.start + worker) % self.streams
        before = np.arange(stream, self.start, self.streams)  # earlier steps of this stream
        done = np.bincount(self.bucket_of_steps(before), minlength=len(self.shards.buckets)) if len(before) else \
            np.zeros(len(self.shards.buckets), np.int64)
        stats = LoaderStats()
        ring = self.ring if info is not None else None  # set by Loader before the workers fork
        streams: dict[int, BucketStream] = {}
        slot: list[int] = []

        def allocate(nbytes: int) -> torch.UntypedStorage:  # a free ring slot, else the default way
            got = ring.claim(worker, nbytes)
            if got is None:
                return torch.UntypedStorage._new_shared(nbytes)
            slot.append(got)
            return ring.storage(worker, got)
        step = self.start + worker
        while self.stop is None or step < self.stop:
            b = int(self.bucket_of_steps(np.array([step]))[0])
            bucket = self.shards.buckets[b]
            if b not in streams:
                key = (self.seed, self.rank, stream, zlib.crc32(bucket.name.encode()))
                streams[b] = BucketStream(self._urls_for(self.shards.urls[bucket.name], stream), key, self.cfg, stats)
                streams[b].seek(int(done[b]) * bucket.batch_size)
            samples = [next(streams[b]) for _ in range(bucket.batch_size)]
            slot.clear()
            batch = collate(samples, step, bucket.name, allocate if ring is not None else None)
            batch.stats = dict(stats.as_dict(), stream=stream)
            yield ring_batch(ring, worker, slot[0], batch) if slot else batch
            step += self.streams


class Loader:
    """Iterates Batches of a BatchStream through a torch DataLoader (batch_size=None: the stream batches
    by bucket itself). With workers, the batches come through reused shared memory (train/batchring.py)."""

    def __init__(self, stream: BatchStream):
        self.stream = stream

    def _dataloader(self, fork: bool) -> torch.utils.data.DataLoader:
        # pin_memory: batches land in page-locked memory, so the copy to the GPU is asynchronous
        kw = dict(num_workers=self.stream.streams if self.stream.cfg.num_workers > 0 else 0, batch_size=None,
                  pin_memory=torch.cuda.is_available())
        if self.stream.cfg.num_workers > 0:  # workers leave SIGTERM/SIGINT to the main process (train/signals.py)
            kw.update(prefetch_factor=PREFETCH, persistent_workers=False, worker_init_fn=signals.ignore_in_worker,
                      timeout=max(0.0, float(self.stream.cfg.worker_timeout_s)))
        if fork:  # the workers inherit the ring's memory and semaphores
            kw.update(multiprocessing_context="fork")
        return torch.utils.data.DataLoader(self.stream, **kw)

    def __iter__(self) -> Iterator[Batch]:
        cfg, ring = self.stream.cfg, None
        if cfg.num_workers > 0 and cfg.worker_ring_mb > 0 and BatchRing.usable():
            slots = PREFETCH + 2  # in flight per worker: PREFETCH queued, one being made, one being copied out
            ring = BatchRing(self.stream.streams, slots, cfg.worker_ring_mb * 2**20 // slots)
        self.stream.ring = ring
        watch = None
        try:
            it = iter(self._dataloader(fork=ring is not None))
            watch = watchdog.Watch(self.stream, it, cfg.worker_timeout_s) if cfg.num_workers > 0 else None
            while True:
                try:
                    batch = next(it)
                except StopIteration:
                    break
                except RuntimeError as e:  # a stalled or dead worker: one line naming it (train/watchdog.py)
                    failure = watchdog.explain(e) if watch is not None else None
                    if failure is None:
                        raise
                    raise failure from None
                batch = batch.unpack() if isinstance(batch, RingBatch) else batch
                if watch is not None and isinstance(batch, Batch):
                    watch.delivered(batch.step)
                yield batch
        finally:
            if watch is not None:  # workers still running (left early): ended before the ring they write goes
                watch.close()
            self.stream.ring = None
            if ring is not None:
                ring.close()


PREFETCH = 2  # batches each DataLoader worker keeps ready


def make_loader(stream: BatchStream) -> Loader:
    return Loader(stream)


def total_stats(per_stream: dict[int, dict]) -> dict:
    """Sum the cumulative counters that each stream attaches to its batches."""
    keys = ("corrupt_shards", "bad_samples", "samples", "bytes")
    return {k: sum(s.get(k, 0) for s in per_stream.values()) for k in keys}
