"""train/data.py and train/buckets.py on real webdataset shards written by tests/factories."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.contract import schema
from pipeline.contract.manifest import ShardRecord, write_manifest
from tests.factories import make_sample, write_shards
from train.buckets import bucket_indices, bucket_of_url, schedule_weights
from train.config import DataConfig
from train.data import BatchStream, ShardVersionError, expand_urls, find_shards

STAGE = """name: t
buckets:
  - {height: 32, width: 64, num_frames: 1, batch_size: 4}
  - {height: 32, width: 64, num_frames: 9, batch_size: 2}
  - {height: 48, width: 64, num_frames: 1, batch_size: 3}
"""
COUNTS = {(32, 64, 1): 12, (32, 64, 9): 4, (48, 64, 1): 6}  # t9 is the rare bucket
VIEWS = schema.VIEWS[:3]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_shards(root, COUNTS, per_shard=2, views=VIEWS, num_boxes=3)
    (root / "stage.yaml").write_text(STAGE)
    return root


def data_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(root=str(root), stage=str(root / "stage.yaml"), samples_per_chunk=5, shuffle_buffer=3, **kw)


def test_every_batch_is_one_bucket_with_its_batch_size(shards):
    cfg = data_cfg(shards)
    ss = find_shards(cfg, "train", [])
    sizes = {b.name: b.batch_size for b in ss.buckets}
    assert sizes == {"32x64_t1": 4, "32x64_t9": 2, "48x64_t1": 3}
    seen = set()
    for batch in BatchStream(ss, cfg, seed=3, stop_step=30):
        h, w, t = bucket_of_url(batch.bucket)
        assert len(batch.keys) == sizes[batch.bucket]
        assert all(k.endswith(f"_{t:03d}_{h}x{w}") for k in batch.keys)  # key carries T and HxW
        B = sizes[batch.bucket]
        assert batch.latent_mean.shape == (B, 3, 16, schema.latent_frames(t), h // 8, w // 8)
        assert batch.bev.shape == (B, t, 8, 200, 25) and batch.bev.dtype == torch.uint8  # packed until conditions()
        cond = batch.conditions(torch.zeros(B, 4, 8), torch.ones(B, 4, dtype=torch.bool))
        assert cond.bev.shape == (B, t, 8, 200, 200) and cond.bev.dtype == torch.float32
        assert batch.boxes.shape[:2] == (B, t) and batch.box_view_mask.shape[:3] == (B, t, 3)
        assert batch.fill_mask.shape == (B, t, 3) and batch.fill_mask.dtype == torch.bool
        assert batch.source_intrinsics.shape == (B, 3, 3, 3) and batch.source_intrinsics.dtype == torch.float32
        assert float(batch.source_intrinsics[0, 0, 0, 0]) == pytest.approx(1266.4)   # the 1600x900 K
        seen.add(batch.bucket)
    assert seen == set(sizes)


def test_latents_are_scaled_posterior_draws(shards):
    cfg = data_cfg(shards)
    ss = find_shards(cfg, "train", [])
    batch = next(iter(BatchStream(ss, cfg, seed=0, stop_step=1)))
    # the factory's sample i is seeded; find the stored mean of the first key and compare
    from pipeline.contract.shardio import iter_shard
    stored = {}
    for url in ss.urls[batch.bucket]:
        for key, members in iter_shard(url):
            stored[key] = schema.decode_sample(members, key)
    s = stored[batch.keys[0]]
    scale = s.meta["vae"]["scaling_factor"]
    z = batch.sample_latents(torch.Generator().manual_seed(0))[0].numpy()
    eps = (z / scale - s.latent_mean.astype(np.float32)) / s.latent_std.astype(np.float32)
    assert not np.allclose(z, s.latent_mean * scale)          # a draw, not the mean
    assert abs(eps.mean()) < 0.1 and 0.9 < eps.std() < 1.1     # z = s * (mean + std * N(0, 1))


def test_bucket_frequencies_match_schedule():
    """Each step is an independent draw, so bucket counts are Binomial(n, w): allow 4 sigma."""
    n = 20000
    for weights in (np.array([0.5, 0.3, 0.2]), np.full(4, 0.25)):
        idx = bucket_indices(weights, seed=7, rank=1, steps=np.arange(n))
        freq = np.bincount(idx, minlength=len(weights)) / n
        tol = 4 * np.sqrt(weights * (1 - weights) / n)
        assert np.all(np.abs(freq - weights) < tol), (freq, weights)
    # ranks draw different sequences
    w = np.full(3, 1 / 3)
    assert (bucket_indices(w, 7, 0, np.arange(100)) != bucket_indices(w, 7, 1, np.arange(100))).any()


def test_schedule_balanced_repeats_rare_bucket(shards):
    """Appendix B: rare long clips get as many batches as the common buckets (so they repeat)."""
    cfg = data_cfg(shards)
    ss = find_shards(cfg, "train", [])
    n = 600
    stream = BatchStream(ss, cfg, seed=1, stop_step=n)
    counts = np.bincount(stream.bucket_of_steps(np.arange(n)), minlength=3) / n
    tol = 4 * np.sqrt((1 / 3) * (2 / 3) / n)
    assert np.all(np.abs(counts - 1 / 3) < tol)
    # 4 clips of t9 at batch size 2 make 2 batches per pass; 60 steps give ~20 of them: repeats
    rare = [k for b in BatchStream(ss, cfg, seed=1, stop_step=60) if b.bucket == "32x64_t9" for k in b.keys]
    assert len(set(rare)) == 4 and len(rare) >= 4 * 4
    prop = schedule_weights(ss.buckets, "proportional", {"32x64_t1": 12, "32x64_t9": 4, "48x64_t1": 6})
    np.testing.assert_allclose(prop, np.array([3, 2, 2]) / 7)  # samples / batch size


def test_resumed_stream_equals_uninterrupted(shards):
    cfg = data_cfg(shards)
    ss = find_shards(cfg, "train", [])
    full = list(BatchStream(ss, cfg, seed=5, stop_step=16))
    tail = list(BatchStream(ss, cfg, seed=5, start_step=9, stop_step=16))
    assert [b.step for b in tail] == list(range(9, 16))
    for a, b in zip(full[9:], tail):
        assert a.keys == b.keys and a.bucket == b.bucket
        assert torch.equal(a.latent_mean, b.latent_mean) and torch.equal(a.boxes, b.boxes)


def test_two_streams_interleave_deterministically(shards):
    cfg = data_cfg(shards, num_workers=2)
    ss = find_shards(cfg, "train", [])
    from train.data import make_loader
    got = [(b.step, b.keys) for b in make_loader(BatchStream(ss, cfg, seed=2, start_step=3, stop_step=11))]
    assert [s for s, _ in got] == list(range(3, 11))
    again = [(b.step, b.keys) for b in make_loader(BatchStream(ss, cfg, seed=2, start_step=3, stop_step=11))]
    assert got == again


def test_url_forms(shards, tmp_path):
    cfg = data_cfg(shards)
    brace = str(shards / "train" / "32x64_t1" / "shard-{000000..000005}.tar")
    glob = str(shards / "train" / "48x64_t1" / "*.tar")
    pipe = "pipe:cat " + str(shards / "train" / "32x64_t9" / "shard-000000.tar")
    urls = expand_urls([brace, glob, pipe])
    assert len(urls) == 6 + 3 + 1 and urls[-1] == pipe
    ss = find_shards(cfg, "train", [brace, glob, pipe])
    assert ss.urls["32x64_t9"] == [pipe]
    batches = [b for b in BatchStream(ss, cfg, seed=0, stop_step=12) if b.bucket == "32x64_t9"]
    assert batches and all(k.startswith("synth-0000") for b in batches for k in b.keys)  # shard 0 only
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_urls([str(tmp_path / "nothing-*.tar")])


def test_object_store_urls_through_fsspec(shards):
    import fsspec
    mem = fsspec.filesystem("memory")
    for p in sorted((shards / "train").rglob("*.tar")):
        mem.pipe(f"/bucket/train/{p.parent.name}/{p.name}", p.read_bytes())
    cfg = DataConfig(shards=["memory://bucket/train/*/shard-*.tar"], stage=str(shards / "stage.yaml"),
                     samples_per_chunk=5, shuffle_buffer=3)
    ss = find_shards(cfg, "train", cfg.shards)
    assert all(u.startswith("memory://") for us in ss.urls.values() for u in us)
    local = find_shards(data_cfg(shards), "train", [])
    a = [b.keys for b in BatchStream(ss, cfg, seed=4, stop_step=6)]
    b = [b.keys for b in BatchStream(local, data_cfg(shards), seed=4, stop_step=6)]
    assert a == b  # same bytes, same order, whatever the store


def test_truncated_shard_is_skipped_and_counted(shards, tmp_path, caplog):
    root = tmp_path / "damaged"
    write_shards(root, {(32, 64, 1): 8}, per_shard=2, views=VIEWS, num_boxes=3)
    bad = root / "train" / "32x64_t1" / "shard-000001.tar"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) * 2 // 3])  # cut inside the second sample
    (root / "garbage").mkdir()
    (root / "train" / "32x64_t1" / "shard-000009.tar").write_bytes(b"not a tar at all" * 100)
    (root / "stage.yaml").write_text(STAGE)
    cfg = data_cfg(root)
    ss = find_shards(cfg, "train", [])
    with caplog.at_level(logging.WARNING, logger="train.data"):
        batches = list(BatchStream(ss, cfg, seed=0, stop_step=25))
    assert len(batches) == 25 and all(len(b.keys) == 4 for b in batches)
    stats = batches[-1].stats
    # counted per shard and per sample, however often the chunks re-read them (25 batches read each shard often)
    assert stats["corrupt_shards"] == 2, stats     # the truncated one and the garbage one
    assert stats["bad_samples"] == 1, stats        # the partial sample before the cut
    assert sum("damaged or unreadable shard" in r.message for r in caplog.records) == 2
    good = {k for b in batches for k in b.keys}
    assert len(good) == 7  # 8 samples, one lost in the cut


@pytest.mark.parametrize("version", ["1.0", "2.0", "4.0"])
def test_other_schema_major_is_refused(tmp_path, version):
    """1.x shards (static extrinsics, one box per frame for all views), 2.x (no fill mask, one BEV grid) and future
    majors: rebuild."""
    root = tmp_path / "other"
    s = make_sample(height=32, width=64, num_frames=1, views=VIEWS, num_boxes=2)
    members = schema.encode_sample(s)
    meta = json.loads(members["meta.json"])
    meta["schema_version"] = version
    members["meta.json"] = schema.meta_bytes(meta)
    from pipeline.contract.shardio import write_shard
    write_shard(root / schema.shard_path("train", 32, 64, 1, 0), [(s["key"], members)])
    (root / "stage.yaml").write_text(STAGE)
    cfg = data_cfg(root)
    ss = find_shards(cfg, "train", [])
    major = version.split(".")[0]
    with pytest.raises(ShardVersionError, match=rf"schema major version {major} .*rebuild the shards"):
        next(iter(BatchStream(ss, cfg, seed=0, stop_step=1)))
    # with a manifest the refusal comes before any shard is read
    write_manifest(str(root), "train", [ShardRecord(schema.shard_path("train", 32, 64, 1, 0), "train", "32x64_t1",
                                                    32, 64, 1, 1, 0, "", version, "", [s["key"]])])
    with pytest.raises(ShardVersionError, match=f"schema version {version}"):
        find_shards(cfg, "train", [])


@pytest.mark.parametrize("cells", [200, 400])
def test_torch_bev_unpack_equals_schema_unpack(cells):
    """The batch keeps BEV maps packed; the torch unpack must give exactly schema.unpack_bev's cells and orientation,
    at either grid (the size is inferred from the packed rows)."""
    from train.data import unpack_bev
    rng = np.random.default_rng(0)
    masks = rng.random((2, 3, 8, cells, cells)) < 0.3
    masks[0, 0, 0, 0, 0] = masks[0, 0, 0, -1, -1] = True     # corners: the first and last cell of the row
    masks[0, 0, 0, 0, 1:8] = False
    packed = schema.pack_bev(masks)                           # (..., G, G/8) uint8
    got = unpack_bev(torch.from_numpy(packed))
    assert got.dtype == torch.bool and got.shape == masks.shape
    assert np.array_equal(got.numpy(), schema.unpack_bev(packed)) and np.array_equal(got.numpy(), masks)


def test_a_chunk_reads_every_shard_once_before_any_twice(tmp_path):
    """Shards are drawn without replacement within a round: a chunk that needs as many shards as there are
    reads each of them exactly once (with replacement, 1/e of them would be missed and others read twice)."""
    root = tmp_path / "perm"
    write_shards(root, {(32, 64, 1): 24}, per_shard=2, views=VIEWS, num_boxes=3)  # 12 shards
    (root / "stage.yaml").write_text(STAGE)
    cfg = DataConfig(root=str(root), stage=str(root / "stage.yaml"), samples_per_chunk=24, shuffle_buffer=3)
    ss = find_shards(cfg, "train", [])
    keys = [k for b in BatchStream(ss, cfg, seed=11, stop_step=6) for k in b.keys]  # 6 batches of 4: one chunk
    assert len(keys) == 24 and len(set(keys)) == 24
    again = [k for b in BatchStream(ss, cfg, seed=11, stop_step=6) for k in b.keys]
    other = [k for b in BatchStream(ss, cfg, seed=12, stop_step=6) for k in b.keys]
    assert keys == again and keys != other  # seeded order, not file order


def test_batch_tensors_are_views_of_one_allocation(shards):
    """collate puts a batch in ONE storage (in a DataLoader worker: one shared-memory segment, one file
    descriptor to pass); the values are the plain stack of the decoded samples, zero-padded boxes included."""
    cfg = data_cfg(shards)
    ss = find_shards(cfg, "train", [])
    batch = next(b for b in BatchStream(ss, cfg, seed=3, stop_step=10) if b.bucket == "32x64_t9")
    tensors = {k: v for k, v in vars(batch).items() if isinstance(v, torch.Tensor)}
    assert {t.untyped_storage().data_ptr() for t in tensors.values()} == {batch.latent_mean.untyped_storage().data_ptr()}
    assert all(t.data_ptr() % 64 == 0 for t in tensors.values())
    assert batch.box_class.dtype == torch.long and batch.scaling_factor.dtype == torch.float64
    from pipeline.contract.shardio import iter_shard
    stored = {key: schema.decode_sample(m, key) for url in ss.urls[batch.bucket] for key, m in iter_shard(url)}
    for i, key in enumerate(batch.keys):
        s = stored[key]
        n = s.box_class.shape[0]
        assert np.array_equal(batch.latent_mean[i].numpy(), s.latent_mean)
        assert np.array_equal(batch.view_boxes[i, :, :, :n].numpy(), s.view_boxes)
        assert not batch.view_boxes[i, :, :, n:].any() and not batch.box_view_mask[i, :, :, n:].any()
        assert np.array_equal(batch.box_class[i, :n].numpy(), s.box_class)
        assert batch.scaling_factor[i] == s.meta["vae"]["scaling_factor"]


def test_worker_batches_through_the_ring_equal_the_default_hand_over(shards):
    """DataLoader workers hand batches over through reused shared-memory slots (train/batchring.py): the
    batches equal those of torch's default hand-over (worker_ring_mb=0), all of them kept at once while the
    workers went on reusing the slots (the trainer's copy is its own), and the slots were reused."""
    import train.batchring as batchring
    from train.data import PREFETCH, make_loader
    cfg = data_cfg(shards, num_workers=2)
    ss = find_shards(cfg, "train", [])
    taken = []
    take = batchring.BatchRing.take

    def counting_take(self, rb, pin=False):
        taken.append((rb.worker, rb.slot))
        return take(self, rb, pin)
    batchring.BatchRing.take = counting_take
    try:
        ring = list(make_loader(BatchStream(ss, cfg, seed=2, stop_step=24)))
    finally:
        batchring.BatchRing.take = take
    plain = list(make_loader(BatchStream(ss, data_cfg(shards, num_workers=2, worker_ring_mb=0), seed=2, stop_step=24)))
    assert len(taken) == 24 and len(set(taken)) <= 2 * (PREFETCH + 2) < len(taken)  # 2 workers' slots, reused
    assert [b.keys for b in ring] == [b.keys for b in plain]
    for a, b in zip(ring, plain):
        for name, t in vars(a).items():
            if isinstance(t, torch.Tensor):
                assert t.dtype == getattr(b, name).dtype and torch.equal(t, getattr(b, name)), name
        assert a.stats == b.stats and a.step == b.step
