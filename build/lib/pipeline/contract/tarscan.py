"""The one tar reader of the shards: every header field checked, damage skipped, nothing intact lost.

The trainer (train/tario.py), ``mdv2-inspect`` and ``mdv2-stats`` read shards through
:func:`iter_samples`. A shard is a tar of ``{key}.{member}`` files (pipeline/contract/shardio.py writes
plain ustar); damage of any kind costs only the samples it touches:

- every header is checked field by field before it is trusted: the checksum, each numeric field
  (octal, or GNU base-256), the type byte, the magic, a UTF-8 name; a block that fails is damage,
  and reading goes on at the next valid header found after it (the search looks for the ``ustar``
  magic at any byte offset, so bytes lost or inserted mid-file are survived too);
- a member's size is checked against what it holds: the padding after it must be NUL (a size that
  shrank or grew inside its block shows there), a ``.npy`` member must be exactly its header plus
  dtype x shape, a text member (``.json``, ``.txt``) must hold no NUL; a member that fails marks its
  sample damaged and the search for the next header starts right after the member's own header
  (a size that lied upwards swallowed the members after it: they are found again);
- a zero block where a header was due ends the archive only when no valid header follows;
  truncation, a missing end-of-archive marker and non-zero trailing bytes are reported too;
- pax (``x``/``g``) and GNU long-name (``L``/``K``) headers are read; any other member type is
  damage (its sample is incomplete), never a silent stop.

What is reported: :class:`Damage` records, each with the byte range it covers, its reason, and the
sample key it hit when one is known (a sample joined across a damaged region, or holding a member
that failed its check). A sample that comes out incomplete (a member lost with a damaged header) is
yielded as it is: the contract's check (``schema.decode_sample``) rejects it and the caller counts it.
What cannot be seen here: bytes flipped inside an array's payload or a string keep their framing,
so the sample reads as the bytes on disk; the manifest's sha256 covers those (``mdv2-stats``).
Standard library only.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Callable, Iterator

BLOCK = 512
REGULAR = (b"0", b"\0", b"7")               # regular files (7: contiguous)
NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, fifos: skipped, size 0
PAX, PAX_GLOBAL, GNU_NAME, GNU_LINK = b"x", b"g", b"L", b"K"
MAGICS = (b"ustar\x0000", b"ustar  \x00", b"\0" * 8)  # POSIX ustar, GNU, v7 (no magic)
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members
_NPY_MAGIC = b"\x93NUMPY"
_TEXT = (".json", ".txt", ".cls", ".txt.gz")
_NUMERIC = (("mode", 100, 108), ("uid", 108, 116), ("gid", 116, 124), ("mtime", 136, 148))
_DEV = (("devmajor", 329, 337), ("devminor", 337, 345))


@dataclass(frozen=True)
class Damage:
    """A damaged region of a shard: bytes [start, end), why, and the sample it hit when known."""
    url: str
    start: int
    end: int
    reason: str
    key: str | None = None
    dropped: bool = False     # this record is the sample ``key`` left out (iter_samples), not a region

    def __str__(self) -> str:
        hit = f" (sample {self.key})" if self.key else ""
        return f"{self.url}: bytes {self.start}-{self.end}: {self.reason}{hit}"


@dataclass(frozen=True)
class Member:
    name: str
    start: int    # first byte of the data (after the header)
    size: int


class HeaderError(ValueError):
    """A 512-byte block that is not a valid tar header; the message names the field."""


_FIXED_OK: set[bytes] = set()  # header bytes outside name, size, checksum and type already checked
_OCTAL = re.compile(rb" *([0-7]*)(?:[\0 ][\0 ]*)?")


def _number(field: bytes, what: str) -> int:
    """A tar numeric field: octal digits (leading spaces, then NUL/space terminated), or GNU base-256."""
    if field[:1] in (b"\x80", b"\xff"):
        n = int.from_bytes(field[1:], "big")
        return n - (1 << (8 * (len(field) - 1))) if field[:1] == b"\xff" else n
    m = _OCTAL.fullmatch(field)
    if m is None:
        raise HeaderError(f"{what} field {bytes(field)!r} is not an octal number")
    return int(m.group(1), 8) if m.group(1) else 0


def parse_header(block: bytes) -> tuple[str, int, bytes]:
    """(name, size, type) of a header block; HeaderError naming the first field that does not parse or lies."""
    magic = block[257:265]
    if magic not in MAGICS:
        raise HeaderError(f"magic {bytes(magic)!r} is not ustar, GNU or v7")
    stored = _number(block[148:156], "checksum")
    unsigned = sum(block) - sum(block[148:156]) + 8 * 32
    if stored != unsigned and stored != unsigned - 256 * sum(1 for c in block if c > 127):  # signed-sum tars
        raise HeaderError(f"checksum {stored} does not match the header's bytes ({unsigned})")
    fixed = bytes(block[100:124]) + bytes(block[136:148]) + bytes(block[257:345])
    if fixed not in _FIXED_OK:  # mode, uid, gid, mtime, magic, devices: the same in every header of a shard
        for what, a, b in _NUMERIC:
            _number(block[a:b], what)
        if magic != MAGICS[2]:
            for what, a, b in _DEV:
                _number(block[a:b], what)
        if len(_FIXED_OK) < 256:
            _FIXED_OK.add(fixed)
    kind = block[156:157]
    size = _number(block[124:136], "size")
    if size < 0:
        raise HeaderError(f"size {size} is negative")
    if kind in NO_DATA and kind != b"5" and size:  # tarfile also writes size 0 for links and devices
        raise HeaderError(f"type {kind!r} carries no data but the size field says {size}")
    raw = block[:100].split(b"\0", 1)[0]
    if magic == MAGICS[0]:
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            raw = prefix + b"/" + raw
    if not raw:
        raise HeaderError("empty name")
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HeaderError(f"name {bytes(raw[:40])!r} is not UTF-8") from None
    return name, size, bytes(kind)


def _valid_at(data, pos: int) -> bool:
    if pos < 0 or pos + BLOCK > len(data):
        return False
    try:
        parse_header(data[pos:pos + BLOCK])
    except HeaderError:
        return False
    return True


def next_header(data, start: int) -> int | None:
    """The first offset >= start holding a valid header (any alignment: bytes may have been lost), or None."""
    at = start + 257
    while True:
        at = data.find(b"ustar", at)
        if at < 0:
            return None
        if _valid_at(data, at - 257):
            return at - 257
        at += 1


def _is_zero(data, a: int, b: int) -> bool:
    chunk = data[a:b]
    return chunk.count(0) == len(chunk)


_NPY_HEADERS: dict[bytes, int | None] = {}  # npy header text -> data bytes it announces (None: unreadable)


def _npy_problem(head: bytes, size: int) -> str | None:
    """Why a .npy member of ``size`` bytes (``head``: its first bytes) is not exactly header + dtype x shape."""
    if len(head) < 10 or head[:6] != _NPY_MAGIC:
        return "not a .npy (no NUMPY magic)"
    major = head[6]
    hlen_at, hlen_n = (8, 2) if major == 1 else (8, 4)
    offset = hlen_at + hlen_n + int.from_bytes(head[hlen_at:hlen_at + hlen_n], "little")
    if offset > len(head):
        return "the .npy header runs past the member"
    text = bytes(head[hlen_at + hlen_n:offset])
    want = _NPY_HEADERS.get(text, -1)
    if want == -1:
        want = _npy_bytes(text)
        if len(_NPY_HEADERS) < 4096:
            _NPY_HEADERS[text] = want
    if want is None:
        return "the .npy header does not parse"
    if size - offset != want:
        return f"the .npy header announces {want} data bytes, the member holds {size - offset}"
    return None


def _npy_bytes(text: bytes) -> int | None:
    """Data bytes a .npy header announces (dtype itemsize x shape); None when it does not parse. No numpy:
    the plain dtypes of the contract ('<f2', '|b1', ...) carry their itemsize in their name."""
    try:
        d = ast.literal_eval(text.decode("latin1"))
        descr, shape = d["descr"], tuple(int(n) for n in d["shape"])
    except Exception:
        return None
    m = re.fullmatch(r"[<>|=]?([biufcSUV?])(\d*)", descr) if isinstance(descr, str) else None
    if m is None:
        return None
    item = (int(m.group(2)) if m.group(2) else 1) * (4 if m.group(1) == "U" else 1)
    n = 1
    for k in shape:
        if k < 0:
            return None
        n *= k
    return n * item


def member_problem(name: str, data, start: int, size: int) -> str | None:
    """Why a member's bytes disagree with its name's format (None when they agree)."""
    if name.endswith(".npy"):
        return _npy_problem(data[start:start + min(size, 4096)], size)
    if name.endswith(_TEXT) and data.find(b"\0", start, start + size) >= 0:
        return "a NUL byte inside a text member (its size field grew past the text?)"
    return None


def _pax_fields(payload: bytes) -> dict[str, str]:
    """'LEN key=value\\n' records of a pax header (only path and size are used)."""
    out, pos = {}, 0
    while pos < len(payload):
        sp = payload.find(b" ", pos)
        if sp < 0:
            raise HeaderError("pax record without a length")
        n = int(payload[pos:sp])
        if n <= sp - pos:
            raise HeaderError(f"pax record length {n} is too short")
        rec = payload[sp + 1:pos + n - 1]
        key, _, value = rec.partition(b"=")
        out[key.decode("utf-8")] = value.decode("utf-8")
        pos += n
    return out


def _name_in(block: bytes) -> str | None:
    """The key a (possibly damaged) header names, best effort: which sample a bad header hit."""
    try:
        return split_key(block[:100].split(b"\0", 1)[0].decode("utf-8"))[0]
    except UnicodeDecodeError:
        return None


def scan(data, url: str = "") -> Iterator[Member | Damage]:
    """The members of a tar held in ``data`` (bytes, bytearray, mmap), in order, with Damage records between
    them where the bytes are not a valid tar. Never raises on bad bytes."""
    pos, end = 0, len(data)
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        if pos + BLOCK > end:
            if pos < end:   # the name field (100 bytes) may have survived: which sample the cut hit
                key = _name_in(bytes(data[pos:end])) if end - pos >= 100 else None
                yield Damage(url, pos, end, f"the shard ends inside a header (byte {pos} of {end}): truncated", key)
            else:
                yield Damage(url, pos, end, "no end-of-archive blocks: truncated at a member boundary")
            return
        block = data[pos:pos + BLOCK]
        if block.count(0) == BLOCK:
            nxt = next_header(data, pos + BLOCK)
            if nxt is None:
                if not _is_zero(data, pos, end):
                    yield Damage(url, pos, end, "non-zero bytes after the end of the archive")
                return
            yield Damage(url, pos, nxt, "a zero block where a header was due")
            pos = nxt
            continue
        try:
            name, size, kind = parse_header(block)
        except HeaderError as e:
            nxt = next_header(data, pos + 1)
            yield Damage(url, pos, end if nxt is None else nxt, f"bad header: {e}", _name_in(block))
            if nxt is None:
                return
            pos = nxt
            continue
        start = pos + BLOCK
        if kind in NO_DATA:
            size = 0
        elif kind in REGULAR and pax.get("size", "").isdigit():  # pax carries sizes past the 8 GiB of the field
            size = int(pax["size"])
        padded = start + (size + BLOCK - 1) // BLOCK * BLOCK
        if padded > end:
            problem = f"needs {size} bytes at {start}, the shard has {end}"
        elif not _is_zero(data, start + size, padded):
            problem = f"the padding after its {size} bytes is not zero (its size field lies or the bytes are damaged)"
        elif kind in REGULAR:
            problem = member_problem(pax.get("path", long_name or name), data, start, size)
        else:
            problem = None
        if problem:
            # the search starts inside the member: a size that lied upwards swallowed the headers after it
            nxt = next_header(data, start)
            yield Damage(url, pos, end if nxt is None else nxt, f"member {name}: {problem}", split_key(name)[0])
            long_name, pax = None, {}
            if nxt is None:
                return
            pos = nxt
            continue
        if kind == GNU_NAME:
            long_name = bytes(data[start:start + size]).split(b"\0", 1)[0].decode("utf-8", "replace")
        elif kind == PAX:
            try:
                pax = _pax_fields(bytes(data[start:start + size]))
            except (HeaderError, ValueError, UnicodeDecodeError) as e:
                yield Damage(url, pos, padded, f"unreadable pax header ({e})")
                pax = {}
        elif kind in REGULAR:
            yield Member(pax.get("path", long_name or name), start, size)
            long_name, pax = None, {}
        elif kind not in (PAX_GLOBAL, GNU_LINK) and kind not in NO_DATA:
            yield Damage(url, pos, padded, f"member {name}: unknown member type {kind!r}", split_key(name)[0])
            long_name, pax = None, {}
        else:
            long_name, pax = None, {}
        pos = padded


def split_key(name: str) -> tuple[str | None, str | None]:
    """webdataset's key split: 'dir/key.a.b' -> ('dir/key', 'a.b'); (None, None) without an extension."""
    m = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (m.group(1), m.group(2)) if m else (None, None)


@dataclass
class ShardReport:
    """What one read of one shard found: samples yielded, damaged regions, keys of the samples hit."""
    url: str
    samples: int = 0
    damage: list[Damage] | None = None

    @property
    def damaged_keys(self) -> list[str]:
        return sorted({d.key for d in self.damage or [] if d.key})

    @property
    def ok(self) -> bool:
        return not self.damage


def iter_samples(data, url: str = "", on_damage: Callable[[Damage], None] | None = None,
                 view: bool = True) -> Iterator[dict]:
    """webdataset samples {"__key__", "__url__", suffix: bytes, ...} of a shard held in ``data``, in tar order.

    A sample hit by damage is not yielded: ``on_damage`` gets each Damage of the shard, then one more for
    each sample dropped (its key set, its byte range). ``view``: ``.npy`` members are memoryviews into
    ``data`` (no copy: the loader's arrays stay views of the page cache), the rest bytes."""
    on_damage = on_damage or (lambda d: None)
    mv = memoryview(data) if view else None
    current: dict | None = None
    hurt: list[str] = []            # why the current sample is damaged
    span = [0, 0]                   # its bytes: first header .. end of its last member
    gap: Damage | None = None       # damage seen since the current sample's last member
    doomed: dict[str, str] = {}     # key -> reason, for a damaged member of the sample that comes next

    def close():
        nonlocal current, hurt
        out = None
        if current is not None:
            if hurt:
                on_damage(Damage(url, span[0], span[1], "sample dropped: " + "; ".join(dict.fromkeys(hurt)),
                                 current["__key__"], dropped=True))
            else:
                out = current
        current, hurt = None, []
        return out

    for item in scan(data, url):
        if isinstance(item, Damage):
            on_damage(item)
            if item.key is not None:
                if current is not None and item.key == current["__key__"]:
                    hurt.append(item.reason)
                else:
                    doomed = {item.key: item.reason}
            gap = item
            continue
        if _SKIP_META.match(item.name):
            continue
        key, suffix = split_key(item.name)
        if key is None:
            on_damage(Damage(url, item.start - BLOCK, item.start + item.size, f"member {item.name}: no key.extension"))
            continue
        suffix = suffix.lower()
        if current is None or key != current["__key__"]:
            done = close()
            if done is not None:
                yield done
            current = {"__key__": key, "__url__": url}
            span[0] = item.start - BLOCK
            if key in doomed:
                hurt.append(doomed[key])
        elif gap is not None:  # the same sample on both sides of a damaged region: something of it is gone
            hurt.append(f"a damaged region inside the sample ({gap.reason})")
        gap, doomed = None, {}
        end = item.start + item.size
        span[1] = end
        if suffix in current:
            hurt.append(f"{suffix} appears twice")
        current[suffix] = mv[item.start:end] if (view and suffix.endswith("npy")) else bytes(data[item.start:end])
    done = close()
    if done is not None:
        yield done


def read_shard(data, url: str = "", view: bool = False) -> tuple[list[dict], ShardReport]:
    """Every intact sample of a shard and its report (the tools' way: whole shards, bytes members)."""
    report = ShardReport(url, damage=[])
    samples = list(iter_samples(data, url, report.damage.append, view=view))
    report.samples = len(samples)
    return samples, report
