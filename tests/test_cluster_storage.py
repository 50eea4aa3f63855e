"""pipeline/contract/storage.py against local disk and a real S3-compatible server (moto, 127.0.0.1).

Covers: atomic writes (nothing half-written becomes visible), listing, manifests on s3://,
retries of transient failures injected on the wire, and streaming shards from the bucket
with webdataset the way the trainer does."""
from __future__ import annotations

import os
from contextlib import contextmanager

import fsspec
import pytest
import webdataset as wds

from factories import write_shards
from pipeline.contract import manifest, schema, storage
from pipeline.contract.shardio import iter_shard, sha256_bytes
from s3_server import FaultProxy, aws_env, s3_server  # noqa: F401  (session fixture)


@pytest.fixture
def bucket(s3_server):  # noqa: F811
    """A fresh, empty bucket per test: s3://<name>."""
    s3_server.reset()
    fsspec.filesystem("s3").clear_instance_cache()
    fs = fsspec.filesystem("s3")
    fs.mkdir("mdv2-test")
    return "s3://mdv2-test"


@contextmanager
def client_retries_off():
    """Make s3fs/botocore give up at the first failure, so only pipeline.contract.storage's retries can help."""
    import s3fs
    old, old_retries = fsspec.config.conf.get("s3"), s3fs.S3FileSystem.retries
    fsspec.config.conf["s3"] = {"config_kwargs": {"retries": {"max_attempts": 1}}}
    s3fs.S3FileSystem.retries = 1
    try:
        yield
    finally:
        s3fs.S3FileSystem.retries = old_retries
        if old is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = old


def test_local_atomic_write_leaves_no_temp(tmp_path):
    target = tmp_path / "a" / "b.bin"
    storage.atomic_write(str(target), b"one")
    storage.atomic_write(str(target), b"two")
    assert target.read_bytes() == b"two"
    assert os.listdir(target.parent) == ["b.bin"]
    # a temp file left by a killed writer is never listed
    (target.parent / f".c.bin{storage.TMP_MARK}123-abc").write_bytes(b"partial")
    assert storage.glob(str(tmp_path / "a" / "*")) == [str(target)]
    assert storage.glob(str(tmp_path / "a" / ".*")) == []


@pytest.mark.parametrize("where", ["local", "s3"])
def test_open_file_commits_only_on_clean_exit(where, tmp_path, bucket):
    base = str(tmp_path) if where == "local" else bucket
    uri = storage.join(base, "x", "shard.tar")
    with pytest.raises(RuntimeError):
        with storage.open_file(uri, "wb") as f:
            f.write(b"half of a shard")
            raise RuntimeError("writer died")
    assert not storage.exists(uri)
    assert storage.glob(storage.join(base, "x", "*")) == []
    with storage.open_file(uri, "wb") as f:
        f.write(b"whole shard")
    assert storage.read_bytes(uri) == b"whole shard"
    with storage.open_file(uri) as f:
        assert f.read() == b"whole shard"


def test_s3_roundtrip(bucket):
    uris = [storage.join(bucket, "train", "224x400_t9", f"shard-{i:06d}.tar") for i in (1, 0)]
    for i, u in enumerate(uris):
        storage.atomic_write(u, bytes([i]) * (1000 + i))
    assert storage.glob(storage.join(bucket, "train", "*", "shard-*.tar")) == sorted(uris)
    assert storage.exists(uris[0]) and storage.size(uris[1]) == 1001
    assert storage.read_bytes(uris[1]) == b"\x01" * 1001
    assert not storage.exists(storage.join(bucket, "nope.tar"))
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(bucket, "nope.tar"))
    storage.remove(storage.join(bucket, "train"))
    assert storage.glob(storage.join(bucket, "train", "*", "*.tar")) == []


def _upload(paths, local_root, bucket) -> list:
    """Write local factory shards (64x128_t9) to the bucket; their manifest rows."""
    records = []
    for p in paths:
        rel = os.path.relpath(p, local_root)
        data = p.read_bytes()
        storage.atomic_write(storage.join(bucket, rel), data)
        keys = [k for k, _ in iter_shard(data)]
        records.append(manifest.ShardRecord(rel, "train", "64x128_t9", 64, 128, 9, len(keys), len(data),
                                            sha256_bytes(data), schema.SCHEMA_VERSION, "cfg", keys))
    return records


def test_manifest_on_s3(bucket, tmp_path):
    paths = write_shards(tmp_path, {(64, 128, 9): 5}, per_shard=2)
    records = _upload(paths, tmp_path, bucket)
    uri = manifest.write_manifest(bucket, "train", records)
    assert uri == f"{bucket}/train/manifest.parquet"
    back = manifest.read_manifest(bucket, "train")
    assert [r.path for r in back] == sorted(r.path for r in records) and sum(r.samples for r in back) == 5
    assert manifest.read_manifest(bucket, "val") == []
    manifest.write_quarantine(bucket, [manifest.QuarantineRecord("encode", "k", "nan", "")])
    assert manifest.read_quarantine(bucket)[0].reason == "nan"


def test_transient_failures_are_retried(bucket, s3_server, monkeypatch):  # noqa: F811
    """An endpoint that answers HTTP 500 to its first connections: the write is retried, and a write that
    finally fails leaves no object behind."""
    uri = storage.join(bucket, "flaky", "shard-000000.tar")
    monkeypatch.setattr(storage, "BACKOFF_S", 0.05)
    with client_retries_off():
        monkeypatch.setattr(storage, "RETRIES", 0)
        with FaultProxy(s3_server.port, fail_first=2) as proxy, aws_env({"AWS_ENDPOINT_URL": proxy.endpoint_url}):
            with pytest.raises(OSError, match="still failing after 1 attempts"):
                storage.atomic_write(uri, b"x" * 4096)
        assert proxy.failed >= 1
        assert not storage.exists(uri), "a failed upload must not leave an object"
        monkeypatch.setattr(storage, "RETRIES", 5)
        with FaultProxy(s3_server.port, fail_first=3) as proxy, aws_env({"AWS_ENDPOINT_URL": proxy.endpoint_url}):
            storage.atomic_write(uri, b"y" * 4096)
            assert storage.read_bytes(uri) == b"y" * 4096
            assert storage.glob(storage.join(bucket, "flaky", "*")) == [uri]
        assert proxy.failed == 3 and proxy.connections > 3


def test_flaky_store_manifest_lists_only_whole_shards(bucket, s3_server, tmp_path, monkeypatch):  # noqa: F811
    """Shards written through a failing endpoint: every manifest row names an object whose bytes match its
    sha256, and there are no other objects (no temporary or partial keys)."""
    monkeypatch.setattr(storage, "BACKOFF_S", 0.02)
    paths = write_shards(tmp_path, {(64, 128, 9): 6}, per_shard=2)
    with client_retries_off(), FaultProxy(s3_server.port, fail_first=4) as proxy, \
            aws_env({"AWS_ENDPOINT_URL": proxy.endpoint_url}):
        records = _upload(paths, tmp_path, bucket)
        manifest.write_manifest(bucket, "train", records)
    assert proxy.failed == 4
    listed = manifest.read_manifest(bucket, "train")
    assert len(listed) == len(paths) == 3
    for r in listed:
        data = storage.read_bytes(storage.join(bucket, r.path))
        assert len(data) == r.bytes and sha256_bytes(data) == r.sha256
    objects = storage.glob(storage.join(bucket, "**"))
    expected = {storage.join(bucket, r.path) for r in listed} | {storage.join(bucket, "train", "manifest.parquet")}
    assert {o for o in objects if not o.endswith("/")} - {f"{bucket}/train", f"{bucket}/train/64x128_t9"} == expected


def test_webdataset_streams_shards_from_s3(bucket, tmp_path):
    paths = write_shards(tmp_path, {(64, 128, 9): 3}, per_shard=2)
    urls = []
    for p in paths:
        uri = storage.join(bucket, os.path.relpath(p, tmp_path))
        storage.atomic_write(uri, p.read_bytes())
        urls.append(uri)
    # in-process through fsspec
    storage.register_webdataset_schemes()
    keys = []
    for raw in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        sample = schema.decode_sample(raw)
        keys.append(sample.key)
        assert sample.latent_mean.shape == (6, 16, 3, 8, 16)
    assert len(keys) == 3
    # in a subprocess through `pipe:` (what a reader without this package's schemes uses)
    piped = [dict(raw)["__key__"] for raw in wds.WebDataset([storage.webdataset_url(u) for u in urls],
                                                             shardshuffle=False, empty_check=False)]
    assert piped == keys


def test_a_command_that_reads_a_manifest_and_exits_does_not_abort(tmp_path):
    """read_table reads in the calling thread. pq.read_table's dataset scanner dropped its Python file object
    on an Arrow pool thread after returning; when the interpreter was already exiting (a command that reads
    a manifest and stops with an error line) that thread could not take the GIL and the process aborted
    ("terminate called without an active exception", exit -6), 25 times in 30 in this very script."""
    import subprocess
    import sys
    uri = manifest.write_manifest(str(tmp_path), "train", [manifest.ShardRecord(
        "train/64x128_t9/shard-000000.tar", "train", "64x128_t9", 64, 128, 9, 1, 10, "0" * 64, "2.0", "cfg", ["k"])])
    script = ("import sys\nfrom pipeline.contract.manifest import read_table\n"
              f"assert read_table({uri!r}).num_rows == 1\nsys.exit(2)\n")
    codes = [subprocess.run([sys.executable, "-c", script], capture_output=True).returncode for _ in range(6)]
    assert codes == [2] * 6, codes
