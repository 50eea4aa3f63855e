"""Local paths and object-store URIs (s3://, gs://, memory://) behind one small API.

Every stage reads and writes through these functions, so ``--out`` and ``--dataroot`` can
be a local folder, a shared mount or a bucket that every node of a cluster sees.

Atomicity (why readers never see half a file):
- local: bytes go to a hidden temporary file in the same folder, are fsync'ed and then
  ``os.replace``'d onto the name (atomic on POSIX within one filesystem); the folder is
  fsync'ed so the rename survives a crash.
- object stores: an object becomes visible only when its upload completes (one PUT, or the
  final CompleteMultipartUpload for big objects) and there is no rename, so the single
  upload *is* the commit; a temporary key plus copy would only double the traffic. A writer
  killed mid-upload leaves no object (at most an incomplete multipart upload, which a bucket
  lifecycle rule ``AbortIncompleteMultipartUpload`` cleans up). After the upload the object's
  size is checked against the bytes sent.
- streams opened for writing with ``open_file(uri, "wb")`` are buffered and committed with
  ``atomic_write`` only when the ``with`` block ends without an exception.
On top of that, readers trust only what a manifest lists (pipeline/contract/manifest.py), and the
manifest is written after its shards, so a crash between the two loses work, never data.

Transient failures (connection resets, timeouts, HTTP 5xx that the client's own retries
did not absorb) are retried here with jittered exponential backoff; errors that retrying
cannot fix (missing file, no permission) are raised at once. A local disk's errors are not
network errors: a full disk or quota, a read-only or broken filesystem (ENOSPC, EDQUOT, EROFS,
EIO, ...) raise :class:`LocalIOError` at once, naming the path and the free space there; only
the errors a network filesystem (NFS, Lustre) gives transiently (ESTALE, ETIMEDOUT, EAGAIN) are
retried on local paths.

Endpoints and credentials come from the standard places: AWS_ENDPOINT_URL /
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or an instance role) for s3://, for example
a MinIO or Ceph server; GOOGLE_APPLICATION_CREDENTIALS for gs://; fsspec's own
configuration (FSSPEC_S3='{"client_kwargs": {...}}') for anything else.

``python -m pipeline.contract.storage cat URI`` writes an object to stdout; webdataset streams
remote shards through it (see ``webdataset_url``).
"""
from __future__ import annotations

import errno
import io
import os
import posixpath
import random
import shutil
import sys
import time
import uuid
from typing import Callable, Iterator, TypeVar

import fsspec
from fsspec.core import url_to_fs

T = TypeVar("T")
RETRIES = 5          # extra attempts after the first; module-level so a deployment (or a test) can change it
BACKOFF_S = 0.2      # first wait; doubles per attempt, with 0.5-1.5x jitter so workers do not retry in lockstep
TMP_MARK = ".tmp-"   # in the names of local temporary files; never listed by glob()

# Raised for conditions a retry cannot change.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError,
)


# On local paths, the only OSErrors worth a retry: a network filesystem's hiccups.
LOCAL_TRANSIENT_ERRNOS = frozenset({errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.EINTR, errno.ECONNRESET})


class LocalIOError(OSError):
    """A local filesystem refused a read or write (full, read-only, broken): retrying does not help. The
    message names the path and the free space; ``errno`` is the original one."""

    def __str__(self) -> str:  # the message already names the path: not OSError's "[Errno 28] ...: 'path'"
        return str(self.strerror)


def _free_space(path: str) -> str:
    folder = os.path.abspath(path)
    while folder and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    try:
        du = shutil.disk_usage(folder)
    except OSError:
        return "free space unknown"
    return f"{du.free / 1e6:.1f} MB free of {du.total / 1e6:.1f} MB on the filesystem of {folder}"


def local_io_error(e: BaseException, path: str, what: str) -> LocalIOError | None:
    """The LocalIOError an OSError on local ``path`` means (None when it is a transient one, or not an OSError)."""
    if isinstance(e, LocalIOError):
        return e
    if not isinstance(e, OSError) or isinstance(e, PERMANENT_ERRORS) or e.errno is None \
            or e.errno in LOCAL_TRANSIENT_ERRNOS:
        return None
    name = errno.errorcode.get(e.errno, str(e.errno))
    hint = {errno.ENOSPC: "free space or use another --out", errno.EDQUOT: "raise the quota or free space",
            errno.EROFS: "the filesystem is read-only: remount it or use another --out",
            errno.EFBIG: "a file size limit (ulimit -f, or the filesystem's) was hit"}.get(e.errno, "check the disk")
    err = LocalIOError(e.errno, f"{what}: {os.strerror(e.errno)} ({name}); {_free_space(path)}; {hint}")
    err.filename = path
    return err


def _transient_errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = [OSError, ConnectionError, TimeoutError, EOFError]
    try:  # s3fs translates most botocore errors to OSError, but not all of them (e.g. endpoint errors)
        from botocore.exceptions import BotoCoreError
        errs.append(BotoCoreError)
    except ImportError:
        pass
    try:
        from aiohttp import ClientError
        errs.append(ClientError)
    except ImportError:
        pass
    return tuple(errs)


TRANSIENT_ERRORS = _transient_errors()


def is_remote(uri: str) -> bool:
    """True for scheme://... URIs other than file://."""
    return "://" in str(uri) and not str(uri).startswith("file://")


def _local(uri: str) -> str:
    uri = str(uri)
    return uri[len("file://"):] if uri.startswith("file://") else uri


def join(base: str, *parts: str) -> str:
    base = str(base)
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path inside it) for a local path or URI."""
    fs, path = url_to_fs(str(uri))
    return fs, path


def with_retries(fn: Callable[[], T], what: str, retries: int | None = None, local: str | None = None) -> T:
    """Run fn; retry transient failures with jittered exponential backoff, then raise OSError naming `what`.
    ``local``: the local path fn works on; its disk errors raise LocalIOError at once (no retry)."""
    retries = RETRIES if retries is None else retries
    for attempt in range(retries + 1):
        try:
            return fn()
        except PERMANENT_ERRORS:
            raise
        except TRANSIENT_ERRORS as e:
            disk = local_io_error(e, local, what) if local is not None else None
            if disk is not None:
                raise disk from e
            if attempt == retries:
                if local is not None:
                    raise OSError(f"{what}: still failing after {retries + 1} attempts ({type(e).__name__}: {e}); "
                                  f"check the (network) filesystem of {local}") from e
                raise OSError(f"{what}: still failing after {retries + 1} attempts ({type(e).__name__}: {e}); "
                              f"check the endpoint, credentials and network, or raise "
                              f"pipeline.contract.storage.RETRIES") from e
            time.sleep(BACKOFF_S * (2 ** attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_local(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write(uri: str, data: bytes) -> None:
    """Write bytes so that readers see either nothing (or the old bytes) or the whole new object."""
    uri = str(uri)
    if not is_remote(uri):
        with_retries(lambda: _atomic_write_local(_local(uri), data), f"writing {uri}", local=_local(uri))
        return
    fs, path = filesystem(uri)

    def put() -> None:
        fs.pipe_file(path, data)
        fs.invalidate_cache(path)
        size = fs.info(path)["size"]
        if size != len(data):  # a proxy or gateway that truncated the body: treat as transient, upload again
            raise ConnectionError(f"{uri} has {size} bytes after upload, expected {len(data)}")

    with_retries(put, f"writing {uri}")


def read_bytes(uri: str) -> bytes:
    if not is_remote(uri):
        def read() -> bytes:
            with open(_local(uri), "rb") as f:
                return f.read()
        return with_retries(read, f"reading {uri}", local=_local(uri))
    fs, path = filesystem(uri)
    return with_retries(lambda: fs.cat_file(path), f"reading {uri}")


def exists(uri: str) -> bool:
    if not is_remote(uri):
        return os.path.exists(_local(uri))
    fs, path = filesystem(uri)

    def check() -> bool:
        fs.invalidate_cache(path)  # another node may have written it since this process last listed
        return fs.exists(path)

    return with_retries(check, f"checking {uri}")


def size(uri: str) -> int:
    if not is_remote(uri):
        return os.path.getsize(_local(uri))
    fs, path = filesystem(uri)
    return int(with_retries(lambda: fs.info(path)["size"], f"reading the size of {uri}"))


def remove(uri: str) -> None:
    """Delete a file, object or folder/prefix (recursively); absent is fine."""
    fs, path = filesystem(uri)
    if exists(uri):
        try:
            with_retries(lambda: fs.rm(path, recursive=True), f"removing {uri}")
        except FileNotFoundError:  # removed by someone else in between
            pass


def glob(pattern: str) -> list[str]:
    """Matching URIs, sorted, with the scheme kept for remote stores; temporary files are never listed."""
    fs, path = filesystem(pattern)

    def listing() -> list[str]:
        fs.invalidate_cache()  # listings are cached per process; other nodes write meanwhile
        return fs.glob(path)

    hits = sorted(h for h in with_retries(listing, f"listing {pattern}") if TMP_MARK not in posixpath.basename(h))
    if is_remote(pattern):
        proto = str(pattern).split("://", 1)[0]
        return [f"{proto}://{h}" for h in hits]
    return hits


class _CommitOnClose(io.BytesIO):
    """A write buffer that becomes the object only when its `with` block ends cleanly."""

    def __init__(self, uri: str) -> None:
        super().__init__()
        self.uri = uri
        self.committed = False

    def commit(self) -> None:
        if not self.committed:
            atomic_write(self.uri, self.getvalue())
            self.committed = True

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        self.close()  # on an exception nothing is written
        return False


def open_file(uri: str, mode: str = "rb"):
    """A file object. "rb" streams (from object stores in blocks, with retries per block by the client);
    "wb" must be used as a context manager and commits atomically on a clean exit."""
    if mode in ("wb", "w"):
        if mode != "wb":
            raise ValueError(f"open_file({uri!r}): mode {mode!r} is not supported; write bytes with 'wb'")
        return _CommitOnClose(str(uri))
    if mode != "rb":
        raise ValueError(f"open_file({uri!r}): mode {mode!r} is not supported; use 'rb' or 'wb'")
    if not is_remote(uri):
        return with_retries(lambda: open(_local(uri), "rb"), f"opening {uri}", local=_local(uri))
    fs, path = filesystem(uri)
    return with_retries(lambda: fs.open(path, "rb"), f"opening {uri}")


# ---- streaming for the trainer -------------------------------------------------------------------

def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **_kw):
    return open_file(url, mode)


def register_webdataset_schemes(schemes: tuple[str, ...] = ("s3", "gs", "gcs", "memory")) -> None:
    """Let webdataset open s3://, gs://, ... shard URLs in-process through fsspec (this module)."""
    import importlib
    gopen = importlib.import_module("webdataset.gopen")  # the module; `webdataset.gopen` the attribute is a function
    for s in schemes:
        gopen.gopen_schemes[s] = _gopen_fsspec


def webdataset_url(uri: str) -> str:
    """A URL any webdataset reader (other process, other version) can open: local paths as they are,
    object-store URIs through ``pipe:python -m pipeline.contract.storage cat URI``."""
    if not is_remote(uri):
        return _local(uri)
    return f"pipe:{sys.executable} -m pipeline.contract.storage cat {uri}"


def iter_chunks(uri: str, chunk: int = 1 << 20) -> Iterator[bytes]:
    with open_file(uri, "rb") as f:
        while data := f.read(chunk):
            yield data


def main(argv: list[str] | None = None) -> int:
    import argparse
    from pipeline.contract.cli import HelpFormatter
    p = argparse.ArgumentParser(prog="python -m pipeline.contract.storage", formatter_class=HelpFormatter,
                                description="Small storage helper: `cat URI` streams a local file or object "
                                            "(s3://, gs://) to stdout, e.g. as a webdataset pipe: URL.")
    sub = p.add_subparsers(dest="cmd", required=True)
    cat = sub.add_parser("cat", help="write the bytes of URI to stdout")
    cat.add_argument("uri")
    ls = sub.add_parser("ls", help="list URIs matching a glob pattern")
    ls.add_argument("pattern")
    args = p.parse_args(argv)
    if args.cmd == "cat":
        out = sys.stdout.buffer
        for data in iter_chunks(args.uri):
            out.write(data)
        out.flush()
    else:
        for u in glob(args.pattern):
            print(u)
    return 0


if __name__ == "__main__":
    sys.exit(main())
