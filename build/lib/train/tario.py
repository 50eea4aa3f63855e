"""Shard reading for the loader at disk speed: one mapping per shard, members as views into it.

tarfile's stream mode copied every member out of a 64 KiB read buffer, built a TarInfo per
member and read the shard in the loader's own thread, so decoding waited for the disk and the
disk for decoding. Here:
- a background thread reads the NEXT shard into the page cache while the loader decodes the
  current one, so the disk and the CPU work overlap, and then maps it: the members are views of
  the page cache itself. Other streams (object stores, pipes) are read whole instead;
- the members are found by pipeline/contract/tarscan.py, the one tar reader of the project (the
  trainer, ``mdv2-inspect`` and ``mdv2-stats`` share it): every header field is checked, damage is
  skipped to the next valid header and reported per shard and per sample, and an intact sample is
  never lost. ``.npy`` members are handed out as memoryviews into the mapping, which
  ``pipeline.contract.npyio.read_npy_fast`` turns into arrays without a copy. The only copy of a latent
  between the page cache and the batch is the collate's stack.
Shards are never rewritten in place (the pipeline writes a temp file and renames it), which is what
makes the mapping safe: a file truncated while mapped would fault the reader.
"""
from __future__ import annotations

import io
import mmap
import os
import sys
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

from pipeline.contract.tarscan import Damage, iter_samples


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
        if n == 0:  # the file shrank: map what is there, the reader reports the truncation
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


def _next_shard(sources: Iterator[dict]):
    """Draw the next shard and read it whole, in the read-ahead thread. Opening AND reading happen
    there, one shard after the other: two draws of the same object (fsspec's memory files are one
    shared object) never overlap. Errors of the draw itself propagate; an open error the draw reports
    (``{"url", "error"}``) and read errors are returned."""
    try:
        source = next(sources)
    except StopIteration:
        return None
    if source.get("error") is not None:
        return source, None, source["error"]
    stream = source["stream"]
    try:
        return source, read_all(stream), None
    except Exception as e:
        return source, None, e
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def _shard_items(read, on_damage: Callable[[Damage], None], per_shard: Callable[[Iterator[dict]], list]) -> list | None:
    """The samples of the shard that ``read`` (a _next_shard future) brings, through ``per_shard``. None when
    the draws are exhausted. A shard that cannot be opened or read is one Damage and no samples."""
    got = read.result()
    if got is None:
        return None
    source, data, error = got
    url = source["url"]

    def samples() -> Iterator[dict]:
        if error is not None:
            on_damage(Damage(url, 0, 0, f"cannot read the shard ({type(error).__name__}: {error})"))
            return
        yield from iter_samples(data, url, on_damage)

    return per_shard(samples())


def tar_samples(sources: Iterator[dict], on_damage: Callable[[Damage], None],
                per_shard: Callable[[Iterator[dict]], list] = list, ahead: int = 2) -> Iterator:
    """{url, stream} (or {url, error}) per shard -> what ``per_shard`` makes of each shard's webdataset samples
    {__key__, __url__, suffix: data} (default: the samples themselves), shard after shard.

    Three stages overlap, one thread each: the next shards are drawn and read from the disk, their
    samples go through ``per_shard`` (and that is what is yielded instead of the samples), and the
    current one is consumed here; up to ``ahead`` shards are read and processed ahead of it, which
    absorbs the jitter between a disk and a decoder of about the same speed. The loader passes the
    decoding of its samples (train/data.py): the schema checks touch every byte, and numpy releases
    the GIL on large arrays, so on two cores the disk, the checks and the batch assembly all run at
    once. ``on_damage`` is called in the decode thread, in shard order."""
    reader = ThreadPoolExecutor(1, thread_name_prefix="shard-read")
    decoder = ThreadPoolExecutor(1, thread_name_prefix="shard-decode")

    def submit():
        return decoder.submit(_shard_items, reader.submit(_next_shard, sources), on_damage, per_shard)
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
