"""Deterministic webdataset tar shards: write atomically, read back member dicts.

A shard is a plain POSIX tar of ``{key}.{member}`` files, which is exactly what
webdataset streams. Every tar header field that could vary between runs (mtime,
uid/gid, user names, mode, member order) is fixed here, so the same samples always
give the same bytes. Standard library + pipeline.contract.schema only.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from pipeline.contract.schema import ordered_members

TAR_MTIME = 0
TAR_MODE = 0o644


def tar_bytes(samples: Iterable[tuple[str, Mapping[str, bytes]]]) -> bytes:
    """Serialise (key, {member: bytes}) pairs, in the order given, to tar bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            if "." in key:
                raise ValueError(f"sample key {key!r} contains '.'; webdataset would split it")
            for name, data in ordered_members(members):
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                info.mtime = TAR_MTIME
                info.mode = TAR_MODE
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to ``path.tmp-<pid>`` then rename, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(path: str | os.PathLike, samples: Iterable[tuple[str, Mapping[str, bytes]]]) -> tuple[int, str]:
    """Write a shard atomically; returns (bytes, sha256)."""
    data = tar_bytes(samples)
    atomic_write_bytes(path, data)
    return len(data), sha256_bytes(data)


def split_member_name(name: str) -> tuple[str, str]:
    """'scene-x_0000_017_224x400.latent_mean.npy' -> ('scene-x_0000_017_224x400', 'latent_mean.npy')."""
    base = name.rsplit("/", 1)[-1]
    key, _, member = base.partition(".")
    return key, member


def iter_shard(source: str | os.PathLike | bytes | io.IOBase) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {member: bytes}) per sample, in tar order. Raises tarfile.TarError on a corrupt shard."""
    if isinstance(source, bytes):
        tar = tarfile.open(fileobj=io.BytesIO(source), mode="r:")
    elif hasattr(source, "read"):  # any readable stream: files, fsspec objects, webdataset pipe: streams
        tar = tarfile.open(fileobj=source, mode="r|")
    else:
        tar = tarfile.open(source, mode="r:")
    with tar:
        key, members = None, {}
        for info in tar:
            if not info.isfile():
                continue
            k, member = split_member_name(info.name)
            if key is not None and k != key:
                yield key, members
                members = {}
            key = k
            f = tar.extractfile(info)
            members[member] = f.read() if f else b""
        if key is not None:
            yield key, members
