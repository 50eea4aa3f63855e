"""Local paths and object-store URIs (s3://, gs://, memory://) behind one small API.

Every stage writes its outputs through these functions so that ``--out`` and
``--dataroot`` can be a local folder or a bucket. Writes are all-or-nothing:
locally a temporary file is renamed into place; on object stores a PUT is atomic
per object (the object appears only when the upload completes), and readers only
trust what a manifest lists. Transient errors are retried with backoff.
"""
from __future__ import annotations

import os
import posixpath
import random
import time
import uuid
from typing import Callable, TypeVar

import fsspec
from fsspec.core import url_to_fs

T = TypeVar("T")
RETRIES = 5
BACKOFF_S = 0.2


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def join(base: str, *parts: str) -> str:
    base = str(base)
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = url_to_fs(str(uri))
    return fs, path


def with_retries(fn: Callable[[], T], what: str, retries: int = RETRIES) -> T:
    """Run fn, retrying OSError/ConnectionError-like failures with jittered exponential backoff."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except (OSError, ConnectionError, TimeoutError) as e:
            if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
                raise
            if attempt == retries:
                raise OSError(f"{what}: still failing after {retries + 1} attempts: {e}") from e
            time.sleep(BACKOFF_S * (2 ** attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def atomic_write(uri: str, data: bytes) -> None:
    """Write bytes so that readers see either nothing or the whole object."""
    uri = str(uri)
    if not is_remote(uri):
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                           f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    fs, path = filesystem(uri)
    with_retries(lambda: fs.pipe_file(path, data), f"writing {uri}")


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return with_retries(lambda: fs.cat_file(path), f"reading {uri}")


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return with_retries(lambda: fs.exists(path), f"checking {uri}")


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        with_retries(lambda: fs.rm(path, recursive=True), f"removing {uri}")


def glob(pattern: str) -> list[str]:
    """Matching URIs, sorted, with the scheme kept for remote stores."""
    fs, path = filesystem(pattern)
    hits = sorted(with_retries(lambda: fs.glob(path), f"listing {pattern}"))
    if is_remote(pattern):
        proto = str(pattern).split("://", 1)[0]
        return [f"{proto}://{h}" for h in hits]
    return hits


def open_file(uri: str, mode: str = "rb"):
    fs, path = filesystem(uri)
    return fs.open(path, mode)
