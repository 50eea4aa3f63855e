"""Shard reading for the loader at disk speed: one mapping per shard, members as views into it.

tarfile's stream mode copied every member out of a 64 KiB read buffer, built a TarInfo per
member and read the shard in the loader's own thread, so decoding waited for the disk and the
disk for decoding. Here:
- a background thread reads the NEXT shard into the page cache while the loader decodes the
  current one, so the disk and the CPU work overlap, and then maps it: the members are views of
  the page cache itself. Other streams (object stores, pipes) are read whole instead;
- the 512-byte ustar headers are parsed by hand (name, size, type: the fields webdataset
  uses), and ``.npy`` members are handed out as memoryviews into the mapping, which
  ``pipeline.contract.npyio.read_npy_fast`` turns into arrays without a copy. The only copy of a latent
  between the page cache and the batch is the collate's stack.
Anything that is not a plain ustar member (pax/GNU long names, sparse files) makes the shard
go through tarfile instead, so every tar that webdataset reads still reads. Shards are never
rewritten in place (the pipeline writes a temp file and renames it), which is what makes the
mapping safe: a file truncated while mapped would fault the reader.
"""
from __future__ import annotations

import io
import mmap
import os
import re
import sys
import tarfile
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members
_BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")           # ustar regular-file type flags
_DIRLIKE = (b"5", b"1", b"2", b"3", b"4", b"6")  # directories, links, devices, fifos: no data, skipped


class TruncatedShard(ValueError):
    """The shard ends inside a header or a member."""


def read_all(stream) -> bytes | bytearray | mmap.mmap:
    """The whole shard. A local file is first read into the page cache (``_into_page_cache``, at disk speed,
    in the read-ahead thread), then mapped, so the arrays are views of the page cache itself: no copy
    between the disk and the batch's np.stack. Other streams are read().

    Not MAP_POPULATE, which did both in one call: it holds the process's memory-map lock while the disk
    reads, and every large allocation of the decoding thread (a batch tensor, a temporary) waits on that
    lock, so the decoder stalled for the disk after all (0.6x of a raw read, bench/loader.py)."""
    fileno = getattr(stream, "fileno", None)
    try:
        fd = fileno() if fileno else None
        size = os.fstat(fd).st_size if fd is not None else 0
    except (OSError, io.UnsupportedOperation):
        fd, size = None, 0
    if not size:
        return stream.read()
    pos = 0
    while pos < size:
        n = _into_page_cache(fd, pos, size - pos)
        if n == 0:  # the file shrank: map what is there, parse_members reports the truncation
            size = pos
            break
        pos += n
    if not size:
        return b""
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)  # stays valid after the file is closed


_DEVNULL: int | None = None
_SCRATCH = threading.local()


def _into_page_cache(fd: int, offset: int, count: int) -> int:
    """Read ``count`` bytes of ``fd`` at ``offset`` into the page cache; bytes read, 0 at the end of the file.

    sendfile to /dev/null: the kernel reads the pages and copies them nowhere, in ONE call per shard. A
    Python loop of read() calls took the GIL back after every call, and while the decoder and the
    batching hold it (switch interval 5 ms) each of those waits stalled the disk: 0.17 GB/s instead of
    2.5 (bench/loader.py's figures). Elsewhere than Linux, read() into a reused 1 MiB buffer."""
    global _DEVNULL
    if hasattr(os, "sendfile") and sys.platform.startswith("linux"):
        if _DEVNULL is None:
            _DEVNULL = os.open(os.devnull, os.O_WRONLY)
        return os.sendfile(_DEVNULL, fd, offset, count)
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None:
        buf = _SCRATCH.buf = bytearray(1 << 20)
    return os.preadv(fd, [buf], offset)


def _octal(field: bytes) -> int:
    field = field.rstrip(b"\0 ").lstrip(b" ")
    return int(field, 8) if field else 0


def parse_members(data: bytes | bytearray) -> tuple[list[tuple[str, int, int]], Exception | None] | None:
    """(name, offset, size) of each regular member of a ustar tar held in ``data``, and the
    TruncatedShard error where the data stops early (the members before it are still good, as with
    tarfile's stream mode). None when the tar uses something else (pax or GNU headers): the caller
    falls back to tarfile."""
    out: list[tuple[str, int, int]] = []
    pos, end = 0, len(data)
    while True:
        if pos + _BLOCK > end:
            return out, TruncatedShard(f"tar ends inside a header at byte {pos} of {end}")
        header = data[pos:pos + _BLOCK]
        if header.count(0) == _BLOCK:  # end-of-archive block
            return out, None
        kind = header[156:157]
        if kind not in _REGULAR and kind not in _DIRLIKE:
            return None
        if (sum(header[:148]) + 256 + sum(header[156:])) != _octal(header[148:156]):
            return out, TruncatedShard(f"bad tar header checksum at byte {pos}")
        size = _octal(header[124:136])
        name = header[:100].split(b"\0", 1)[0]
        if header[257:262] == b"ustar":
            prefix = header[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        start = pos + _BLOCK
        if start + size > end:
            return out, TruncatedShard(f"member {name.decode(errors='replace')} needs {size} bytes at {start}, "
                                       f"the shard has {end}")
        if kind in _REGULAR:
            out.append((name.decode("utf-8"), start, size))
        pos = start + (size + _BLOCK - 1) // _BLOCK * _BLOCK


def _members_of(url: str, data: bytes | bytearray | mmap.mmap) -> Iterator[dict]:
    parsed = parse_members(data)
    view = memoryview(data)
    if parsed is None:  # not plain ustar: tarfile knows every dialect
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                if info.isreg() and not _SKIP_META.match(info.name):
                    yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": url}
        return
    members, error = parsed
    for name, start, size in members:
        if _SKIP_META.match(name):
            continue
        # arrays stay views into the shard (read_npy_fast makes them arrays without a copy); the small
        # members become bytes, which json and str need
        data_ = view[start:start + size] if name.endswith(".npy") else bytes(data[start:start + size])
        yield {"fname": name, "data": data_, "__url__": url}
    if error is not None:
        raise error


def _next_shard(sources: Iterator[dict]):
    """Draw the next shard and read it whole, in the read-ahead thread. Opening AND reading happen
    there, one shard after the other: two draws of the same object (fsspec's memory files are one
    shared object) never overlap. Errors of the draw itself propagate; read errors are returned."""
    try:
        source = next(sources)
    except StopIteration:
        return None
    stream = source["stream"]
    try:
        return source, read_all(stream), None
    except Exception as e:
        return source, None, e
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def _shard_items(read, handler, per_shard: Callable[[Iterator[dict]], list]) -> list | None:
    """The members ({} last) of the shard that ``read`` (a _next_shard future) brings, through
    ``per_shard``. None when the draws are exhausted."""
    got = read.result()
    if got is None:
        return None
    source, data, error = got
    url = source["url"]

    def members() -> Iterator[dict]:
        try:
            if error is not None:
                raise error
            yield from _members_of(url, data)
        except Exception as exn:  # truncated or corrupt shard: the handler counts it, the stream goes on
            exn.args = (*exn.args, url)
            if not handler(exn):
                raise
        yield {}  # the shard's end: a sample cut by a truncation ends here too, and fails its schema check

    return per_shard(members())


def tar_members(sources: Iterator[dict], handler, per_shard: Callable[[Iterator[dict]], list] = list,
                ahead: int = 2) -> Iterator:
    """{url, stream} per shard -> webdataset member dicts {fname, data, __url__}, then {} at the end of
    each shard (group_by_keys never joins samples across shards): webdataset's tar_file_expander contract.

    Three stages overlap, one thread each: the next shards are drawn and read from the disk, their
    members go through ``per_shard`` (and that is what is yielded instead of the members), and the
    current one is consumed here; up to ``ahead`` shards are read and processed ahead of it, which
    absorbs the jitter between a disk and a decoder of about the same speed. The loader passes the
    grouping and the decoding of its samples (train/data.py): the schema checks touch every byte, and
    numpy releases the GIL on large arrays, so on two cores the disk, the checks and the batch assembly
    all run at once."""
    reader = ThreadPoolExecutor(1, thread_name_prefix="shard-read")
    decoder = ThreadPoolExecutor(1, thread_name_prefix="shard-decode")

    def submit():
        return decoder.submit(_shard_items, reader.submit(_next_shard, sources), handler, per_shard)
    try:
        queue = deque(submit() for _ in range(max(1, ahead)))
        while True:
            # the next one is queued before waiting: the reader starts a draw the moment its last read ends
            queue.append(submit())
            items = queue.popleft().result()  # an error of the draw itself (every shard unreadable) ends the stream
            if items is None:
                return
            yield from items
    finally:  # the generator is not touched after we return
        reader.shutdown(wait=False, cancel_futures=True)
        decoder.shutdown(wait=True, cancel_futures=True)
        reader.shutdown(wait=True)
