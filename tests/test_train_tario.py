"""train/tario.py: the loader's shard reader gives tarfile's members, hands arrays out without copies,
keeps the samples before a truncation, reads pax and GNU tars, and hands damage to the caller
(the reader itself, pipeline/contract/tarscan.py, is tested in tests/test_tarscan.py)."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch

from pipeline.contract import schema
from pipeline.contract.shardio import tar_bytes
from pipeline.contract.tarscan import Member, iter_samples, scan
from tests.factories import make_sample
from train.tario import read_all, tar_samples

VIEWS = ["CAM_FRONT", "CAM_BACK"]


def _shard(n: int = 3) -> bytes:
    samples = [make_sample(height=32, width=64, num_frames=9, views=VIEWS, num_boxes=2, seed=i,
                           start=8 * i) for i in range(n)]
    return tar_bytes([(s["key"], schema.encode_sample(s)) for s in samples])


def _tarfile_members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


def test_members_equal_tarfiles_and_arrays_are_views_into_the_shard(tmp_path):
    path = tmp_path / "s.tar"
    path.write_bytes(_shard())
    with open(path, "rb") as f:
        data = read_all(f)
    got = [(s["__key__"] + "." + k, v) for s in iter_samples(data, str(path)) for k, v in s.items()
           if not k.startswith("__")]
    assert [(n, bytes(v)) for n, v in got] == _tarfile_members(path.read_bytes())
    mean = next(v for n, v in got if n.endswith(".latent_mean.npy"))
    arr = schema.npy_load(mean)
    assert np.shares_memory(arr, np.frombuffer(data, np.uint8))  # no copy between the read and the array
    own = schema.npy_load(bytes(mean))                           # bytes in: an array of its own, as np.load
    assert np.array_equal(arr, own) and not np.shares_memory(own, np.frombuffer(data, np.uint8))


def test_truncated_shard_keeps_the_samples_before_the_cut():
    data = _shard()
    members = [m for m in scan(data) if isinstance(m, Member)]
    assert [(m.name, bytes(data[m.start:m.start + m.size])) for m in members] == _tarfile_members(data)
    cut = data[: members[-5].start + 10]  # inside the 5th member from the end: the third sample
    damage = []
    keys = [s["__key__"] for s in iter_samples(cut, "cut", damage.append)]
    assert keys == [m.name.split(".")[0] for m in members[::len(members) // 3]][:2]
    assert "needs" in damage[0].reason and damage[-1].dropped and damage[-1].key == members[-5].name.split(".")[0]
    damage = []   # cut inside the second header, its name field whole: the sample it names is dropped
    assert list(iter_samples(data[:members[1].start - 400], "cut", damage.append)) == []
    assert "ends inside a header" in damage[0].reason and damage[-1].dropped
    assert damage[-1].key == members[0].name.split(".")[0]
    damage = []   # fewer than the name field's 100 bytes: the reader cannot tell whose header it was
    (first,) = iter_samples(data[:members[1].start - 512 + 50], "cut", damage.append)
    assert [k for k in first if not k.startswith("__")] == ["meta.json"] and "ends inside a header" in damage[0].reason
    with pytest.raises(schema.SchemaError, match="missing"):  # incomplete: the contract's check rejects it
        schema.decode_sample(first)


def test_pax_and_gnu_tars_are_read_and_errors_reach_the_handler(tmp_path):
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            for name, payload in (("k" * 120 + ".meta.json", b"{}"), ("x.caption.txt", b"hi")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        (tmp_path / f"{fmt}.tar").write_bytes(buf.getvalue())
    (tmp_path / "cut.tar").write_bytes(_shard()[:3000])
    names = [f"{tarfile.PAX_FORMAT}.tar", "cut.tar", f"{tarfile.GNU_FORMAT}.tar", "missing.tar"]
    sources = iter([{"url": str(tmp_path / n), "stream": open(tmp_path / n, "rb")} if n != "missing.tar"
                    else {"url": str(tmp_path / n), "error": FileNotFoundError("gone")} for n in names])
    damage = []
    out = list(tar_samples(sources, damage.append))
    assert [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in out] == \
        [("k" * 120, ["meta.json"]), ("x", ["caption.txt"])] * 2
    assert {d.url for d in damage} == {str(tmp_path / "cut.tar"), str(tmp_path / "missing.tar")}
    assert any("gone" in d.reason for d in damage)
    with pytest.raises(RuntimeError, match="boom"):  # an error of the shard draw itself is not swallowed
        def draws():
            raise RuntimeError("boom")
            yield
        list(tar_samples(draws(), lambda d: None))


def test_collate_pads_boxes_with_zeros_to_the_batch_maximum():
    from train.data import collate, decode
    samples = [make_sample(height=32, width=64, num_frames=9, views=VIEWS, num_boxes=k, seed=k) for k in (2, 5)]
    decoded = [decode(dict(schema.encode_sample(s), __key__=s["key"])) for s in samples]
    batch = collate(decoded, 0, "32x64_t9")
    for name, axis in (("boxes", 1), ("box_mask", 1), ("box_view_mask", 2), ("box_class", 0)):
        want = np.stack([np.pad(d[name], [(0, 0)] * axis + [(0, 5 - d[name].shape[axis])]
                                + [(0, 0)] * (d[name].ndim - axis - 1)) for d in decoded])
        assert np.array_equal(getattr(batch, name).numpy(), want), name
    assert np.array_equal(batch.latent_mean.numpy(), np.stack([d["latent_mean"] for d in decoded]))


def test_worker_batches_are_built_in_shared_memory_and_equal_the_shard_arrays(tmp_path):
    from tests.factories import write_shards
    from train.config import DataConfig
    from train.data import BatchStream, find_shards, make_loader
    paths = write_shards(tmp_path, {(32, 64, 9): 4}, per_shard=2, views=VIEWS, num_boxes=2)
    (tmp_path / "stage.yaml").write_text("name: t\nbuckets:\n  - {height: 32, width: 64, num_frames: 9, batch_size: 2}\n")
    cfg = DataConfig(root=str(tmp_path), stage=str(tmp_path / "stage.yaml"), num_workers=2, samples_per_chunk=4,
                     shuffle_buffer=2)
    stored = {}
    for p in paths:
        with tarfile.open(p) as tar:
            for m in tar:
                if m.name.endswith(".latent_mean.npy"):
                    stored[m.name.split(".")[0]] = schema.npy_load(tar.extractfile(m).read())
    stream = BatchStream(find_shards(cfg, "train", []), cfg, seed=0, stop_step=4)
    batches = list(make_loader(_SharedInWorker(stream)))
    assert len(batches) == 4
    for b, shared_in_worker in batches:
        # allocated in shared memory by the worker itself: handing it to this process copies nothing
        assert shared_in_worker
        for i, k in enumerate(b.keys):
            assert np.array_equal(b.latent_mean[i].numpy(), stored[k])


class _SharedInWorker(torch.utils.data.IterableDataset):
    """The stream's batches with whether their tensors were in shared memory before the hand-over."""

    def __init__(self, stream):
        self.stream, self.cfg, self.streams = stream, stream.cfg, stream.streams

    def __iter__(self):
        for b in self.stream:
            yield b, all(t.is_shared() for t in (b.latent_mean, b.latent_std, b.boxes, b.box_mask, b.bev))


def test_per_shard_runs_ahead_in_another_thread_and_keeps_the_order(tmp_path):
    """tar_samples hands each shard's samples to per_shard in its decode thread, up to ``ahead`` shards
    before the consumer, and yields the results in draw order; the reads fill the page cache (sendfile)
    and the mapping gives the file's exact bytes."""
    import threading
    urls = []
    for i in range(5):
        (tmp_path / f"{i}.tar").write_bytes(_shard(1 + i % 2))
        urls.append(str(tmp_path / f"{i}.tar"))
    order = [3, 0, 4, 4, 1, 2]
    seen_threads = set()

    def per_shard(samples):
        seen_threads.add(threading.get_ident())
        return [len(list(samples))]  # samples per shard

    for ahead in (1, 3):
        sources = iter([{"url": urls[i], "stream": open(urls[i], "rb")} for i in order])
        got = list(tar_samples(sources, lambda d: None, per_shard=per_shard, ahead=ahead))
        assert got == [1 + i % 2 for i in order]
    assert threading.get_ident() not in seen_threads
    with open(urls[1], "rb") as f:
        assert bytes(read_all(f)) == (tmp_path / "1.tar").read_bytes()
