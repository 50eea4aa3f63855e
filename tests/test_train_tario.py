"""train/tario.py: the loader's shard reader gives tarfile's members, hands arrays out without copies,
keeps the samples before a truncation, and reads non-ustar tars through tarfile."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch

from pipeline.contract import schema
from pipeline.contract.shardio import tar_bytes
from tests.factories import make_sample
from train.tario import _members_of, parse_members, read_all, tar_members

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
    got = list(_members_of(str(path), data))
    assert [(m["fname"], bytes(m["data"])) for m in got] == _tarfile_members(path.read_bytes())
    mean = next(m for m in got if m["fname"].endswith(".latent_mean.npy"))
    arr = schema.npy_load(mean["data"])
    assert np.shares_memory(arr, np.frombuffer(data, np.uint8))  # no copy between the read and the array
    own = schema.npy_load(bytes(mean["data"]))                    # bytes in: an array of its own, as np.load
    assert np.array_equal(arr, own) and not np.shares_memory(own, np.frombuffer(data, np.uint8))


def test_truncated_shard_keeps_the_members_before_the_cut():
    data = _shard()
    full = parse_members(data)[0]
    cut = data[: full[-5][1] + 10]  # inside the 5th member from the end
    members, error = parse_members(cut)
    assert members == full[:-5] and "needs" in str(error)
    members, error = parse_members(data[:full[1][1] - 400])  # inside the second header
    assert len(members) == 1 and "ends inside a header" in str(error)
    bad = bytearray(data)
    bad[512 * 0 + 10] ^= 0xFF  # a flipped byte in the first header name
    assert "checksum" in str(parse_members(bytes(bad))[1])


def test_pax_tars_go_through_tarfile_and_errors_reach_the_handler(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, payload in (("k" * 120 + ".meta.json", b"{}"), ("x.caption.txt", b"hi")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    assert parse_members(buf.getvalue()) is None
    (tmp_path / "pax.tar").write_bytes(buf.getvalue())
    (tmp_path / "cut.tar").write_bytes(_shard()[:3000])
    sources = iter([{"url": str(tmp_path / n), "stream": open(tmp_path / n, "rb")} for n in ("pax.tar", "cut.tar")])
    errors = []
    out = list(tar_members(sources, handler=lambda e: errors.append(e) or True))
    names = [m.get("fname") for m in out]
    assert names[:3] == ["k" * 120 + ".meta.json", "x.caption.txt", None]  # {} ends each shard
    assert len(errors) == 1 and str(tmp_path / "cut.tar") in errors[0].args
    with pytest.raises(RuntimeError, match="boom"):  # an error of the shard draw itself is not swallowed
        def draws():
            raise RuntimeError("boom")
            yield
        list(tar_members(draws(), handler=lambda e: True))


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
    """tar_members hands each shard's members to per_shard in its decode thread, up to ``ahead`` shards
    before the consumer, and yields the results in draw order; the reads fill the page cache (sendfile)
    and the mapping gives the file's exact bytes."""
    import threading
    urls = []
    for i in range(5):
        (tmp_path / f"{i}.tar").write_bytes(_shard(1 + i % 2))
        urls.append(str(tmp_path / f"{i}.tar"))
    order = [3, 0, 4, 4, 1, 2]
    seen_threads = set()

    def per_shard(members):
        seen_threads.add(threading.get_ident())
        return [len([m for m in members if m])]  # members per shard ({} excluded)

    for ahead in (1, 3):
        sources = iter([{"url": urls[i], "stream": open(urls[i], "rb")} for i in order])
        got = list(tar_members(sources, handler=lambda e: False, per_shard=per_shard, ahead=ahead))
        assert got == [len(parse_members(_shard(1 + i % 2))[0]) for i in order]
    assert threading.get_ident() not in seen_threads
    with open(urls[1], "rb") as f:
        assert bytes(read_all(f)) == (tmp_path / "1.tar").read_bytes()
