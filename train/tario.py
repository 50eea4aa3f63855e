"""Shard reading for the loader at disk speed: one mapping per shard, members as views into it.

tarfile's stream mode copied every member out of a 64 KiB read buffer, built a TarInfo per
member and read the shard in the loader's own thread, so decoding waited for the disk and the
disk for decoding. Here:
- a local shard is mapped whole (mmap with MAP_POPULATE: the kernel reads it into the page
  cache and maps every page in one call) by a background thread that maps the NEXT shard while
  the loader decodes the current one, so the disk and the CPU work overlap; other streams
  (object stores, pipes) are read whole instead;
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
import tarfile
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members
_BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")           # ustar regular-file type flags
_DIRLIKE = (b"5", b"1", b"2", b"3", b"4", b"6")  # directories, links, devices, fifos: no data, skipped


class TruncatedShard(ValueError):
    """The shard ends inside a header or a member."""


def read_all(stream) -> bytes | bytearray | mmap.mmap:
    """The whole shard. A local file is mapped (MAP_POPULATE: the kernel reads it into the page cache and
    maps every page at once, in the read-ahead thread), so the arrays are views of the page cache itself:
    no copy at all between the disk and the batch's np.stack. Other streams are read()."""
    fileno = getattr(stream, "fileno", None)
    try:
        fd = fileno() if fileno else None
        size = os.fstat(fd).st_size if fd is not None else 0
    except (OSError, io.UnsupportedOperation):
        fd, size = None, 0
    if not size:
        return stream.read()
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ)  # stays valid after the file is closed


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


def tar_members(sources: Iterator[dict], handler) -> Iterator[dict]:
    """{url, stream} per shard -> webdataset member dicts {fname, data, __url__}, then {} at the end of
    each shard (group_by_keys never joins samples across shards). webdataset's tar_file_expander
    contract; the next shard is read in the background while this one is decoded."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="shard-read")
    try:
        fut = pool.submit(_next_shard, sources)
        while True:
            got = fut.result()  # an error of the draw itself (e.g. every shard unreadable) stops the stream
            if got is None:
                return
            fut = pool.submit(_next_shard, sources)  # read-ahead: the disk works while this shard is decoded
            source, data, error = got
            url = source["url"]
            try:
                if error is not None:
                    raise error
                yield from _members_of(url, data)
                yield {}
            except Exception as exn:  # truncated or corrupt shard: the handler counts it, the stream goes on
                exn.args = (*exn.args, url)
                if not handler(exn):
                    raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # the generator is not touched after we return
