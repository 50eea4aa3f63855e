"""pipeline/contract/tarscan.py, the one tar reader: damage of any kind costs only the samples it touches.

The property test damages real shards (samples of the contract written by the build's own tar writer,
pipeline/contract/shardio.py) at random, a few hundred times: flipped bytes (biased to the headers),
header fields that lie with a recomputed checksum (size, name, type, magic, numbers), zeroed blocks,
bytes inserted or deleted mid-file, truncation, trailing garbage. After each damage:
- every sample whose bytes are untouched is read back, member for member, equal to what was written;
- every sample read back has exactly its members, and those that differ from what was written hold
  a damaged byte (flips inside a payload keep their framing: the reader cannot see them, the
  manifest's sha256 does);
- every other sample is counted: dropped by the reader with its key, rejected by the contract's
  check (schema.decode_sample, as the loader does), or inside a reported damaged region.
"""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pipeline.contract import schema
from pipeline.contract.shardio import tar_bytes
from pipeline.contract.tarscan import BLOCK, Damage, HeaderError, iter_samples, parse_header, read_shard
from tests.factories import make_sample

VIEWS = ["CAM_FRONT", "CAM_BACK"]
LONG = "A wet evening in a dense city; " * 20   # a caption of several blocks


def _shard_and_layout():
    samples = [make_sample(scene_name="synth-0001", start=i * 20, height=32, width=64, num_frames=1, views=VIEWS,
                           num_boxes=i % 3, seed=i, caption=LONG if i == 2 else "Sunny, dry, open road.",
                           with_std=i != 1) for i in range(4)]
    data = tar_bytes([(s["key"], schema.encode_sample(s)) for s in samples])
    layout: dict[str, dict] = {}  # key -> span [first header, end of last member's padding) and members
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar:
            key, _, suffix = m.name.partition(".")
            d = layout.setdefault(key, {"start": m.offset, "members": {}})
            d["members"][suffix] = (m.offset_data, m.size)
            d["end"] = m.offset_data + (m.size + BLOCK - 1) // BLOCK * BLOCK
            d.setdefault("headers", []).append(m.offset)
    return data, layout


DATA, LAYOUT = _shard_and_layout()
HEADERS = sorted(h for d in LAYOUT.values() for h in d["headers"])
FIELDS = {"name": (0, 100), "mode": (100, 108), "uid": (108, 116), "size": (124, 136), "mtime": (136, 148),
          "type": (156, 157), "magic": (257, 265), "prefix": (345, 500), "devmajor": (329, 337)}


class Damaged:
    """A buffer being damaged, with where each original byte went (-1: lost) and which originals were hit."""

    def __init__(self, data: bytes):
        self.buf = bytearray(data)
        self.origin = np.arange(len(data))            # current index -> original index (-1: not original)
        self.touched = np.zeros(len(data), bool)      # original bytes damaged or lost

    def hit(self, a: int, b: int) -> None:
        o = self.origin[a:b]
        self.touched[o[o >= 0]] = True

    def write(self, pos: int, payload: bytes) -> None:
        self.hit(pos, pos + len(payload))
        self.buf[pos:pos + len(payload)] = payload

    def where(self, original: int) -> int:
        hits = np.flatnonzero(self.origin == original)
        return int(hits[0]) if len(hits) else -1

    def splice(self, pos: int, remove: int, insert: bytes) -> None:
        self.hit(max(0, pos - 1), pos + max(1, remove))
        self.buf[pos:pos + remove] = insert
        self.origin = np.concatenate([self.origin[:pos], np.full(len(insert), -1), self.origin[pos + remove:]])


def _checksum(block: bytearray) -> None:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)


@st.composite
def damage_ops(draw):
    ops = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "flip_header", "lie", "lie_size", "zero_block", "splice", "truncate",
                                     "append"]))
        ops.append((kind, draw(st.integers(0, 2**31)), draw(st.binary(min_size=1, max_size=700))))
    return ops


def _apply(ops) -> Damaged:
    d = Damaged(DATA)
    for kind, r, blob in ops:
        rng = np.random.default_rng(r)
        n = len(d.buf)
        if kind == "flip":
            for p in rng.integers(0, n, rng.integers(1, 9)):
                d.write(int(p), bytes([d.buf[p] ^ int(rng.integers(1, 256))]))
        elif kind == "flip_header":  # a byte of some header (where it now is)
            h = d.where(int(rng.choice(HEADERS)))
            if h >= 0:
                p = h + int(rng.integers(0, BLOCK))
                if p < n:
                    d.write(p, bytes([d.buf[p] ^ int(rng.integers(1, 256))]))
        elif kind in ("lie", "lie_size"):  # a field changed and the checksum recomputed: the header "validates"
            h = d.where(int(rng.choice(HEADERS)))
            if h < 0 or h + BLOCK > n:
                continue
            block = bytearray(d.buf[h:h + BLOCK])
            if kind == "lie_size":
                size = int(parse_header(bytes(block))[1]) if _ok(block) else 0
                new = max(0, size + int(rng.choice([-1, 1, -BLOCK, BLOCK, 7, -7, 3 * BLOCK, size])) )
                block[124:136] = b"%011o\0" % new
            else:
                a, b = FIELDS[str(rng.choice(list(FIELDS)))]
                field = blob[:b - a].ljust(b - a, b"\0") if rng.random() < 0.5 else \
                    (b"%0*o\0" % (b - a - 1, int(rng.integers(0, 8 ** min(b - a - 1, 10)))))[:b - a]
                block[a:b] = field
            _checksum(block)
            d.write(h, bytes(block))
        elif kind == "zero_block":
            h = d.where(int(rng.choice(HEADERS)))
            if h >= 0:
                d.write(h, bytes(min(BLOCK, n - h)))
        elif kind == "splice":  # bytes lost or inserted mid-file: every later header moves off the 512 grid
            p = int(rng.integers(0, n))
            d.splice(p, int(rng.integers(0, 700)) if rng.random() < 0.5 else 0, blob if rng.random() < 0.5 else b"")
        elif kind == "truncate":
            p = int(rng.integers(0, n))
            d.hit(p, n)
            d.buf, d.origin = d.buf[:p], d.origin[:p]
        else:
            d.splice(n, 0, blob)
    lost = np.ones(len(DATA), bool)
    lost[d.origin[d.origin >= 0]] = False
    d.touched |= lost
    return d


def _ok(block) -> bool:
    try:
        parse_header(bytes(block))
        return True
    except HeaderError:
        return False


def _check(d: Damaged) -> dict:
    damage: list[Damage] = []
    got = list(iter_samples(bytes(d.buf), "s.tar", damage.append))   # never raises
    dropped = {x.key for x in damage if x.dropped}
    rejected = set()
    read = {}
    for s in got:
        try:
            schema.decode_sample(s)
        except schema.SchemaError:
            rejected.add(s["__key__"])
            continue
        assert s["__key__"] in LAYOUT, f"a sample the shard never held was accepted: {s['__key__']}"
        read[s["__key__"]] = s
    for key, lay in LAYOUT.items():
        span = np.arange(lay["start"], lay["end"])
        intact = not d.touched[span].any()
        if key in read:
            members = {k: bytes(v) for k, v in read[key].items() if not k.startswith("__")}
            assert set(members) == set(lay["members"]), (key, sorted(members))
            for suffix, (a, size) in lay["members"].items():
                if members[suffix] != DATA[a:a + size]:
                    assert d.touched[a:a + size].any(), f"{key}.{suffix} differs but none of its bytes was damaged"
        elif intact:
            pytest.fail(f"intact sample {key} was lost; damage: {[str(x) for x in damage]}")
        else:
            where = np.flatnonzero((d.origin >= lay["start"]) & (d.origin < lay["end"]))
            in_region = any(x.start <= int(p) < max(x.end, x.start + 1) for x in damage if not x.dropped
                            for p in (where[:1].tolist() + where[-1:].tolist()))
            assert key in dropped or key in rejected or in_region or len(where) == 0, \
                f"damaged sample {key} vanished uncounted: {[str(x) for x in damage]}"
    return {"read": len(read), "intact": sum(not d.touched[lay["start"]:lay["end"]].any() for lay in LAYOUT.values()),
            "damage": len(damage)}


def test_an_undamaged_shard_reads_every_sample_and_reports_nothing():
    samples, report = read_shard(DATA, "s.tar")
    assert report.ok and [s["__key__"] for s in samples] == list(LAYOUT)
    for s in samples:
        schema.decode_sample(s)
        for suffix, (a, size) in LAYOUT[s["__key__"]]["members"].items():
            assert s[suffix] == DATA[a:a + size]


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(damage_ops())
def test_damage_costs_only_the_samples_it_touches(ops):
    _check(_apply(ops))


def test_the_property_check_fails_on_a_reader_that_stops_at_the_first_bad_header(monkeypatch):
    """The check can fail: with the old behaviour (a bad header ends the shard) an intact later sample is lost."""
    from pipeline.contract import tarscan
    monkeypatch.setattr(tarscan, "next_header", lambda data, start: None)
    first = min(LAYOUT.values(), key=lambda x: x["start"])
    d = Damaged(DATA)
    d.write(first["headers"][1] + 10, b"\xff")  # the name of the first sample's second member
    with pytest.raises(pytest.fail.Exception, match="intact sample"):
        _check(d)


@pytest.mark.parametrize("case", ["size_grew_in_block", "unknown_type", "not_octal", "trailing", "zero_header",
                                  "size_shrank"])
def test_each_named_defect_drops_only_its_sample(case):
    """The issue's cases one by one: the damaged sample is dropped with its key, every other is read."""
    keys = list(LAYOUT)
    victim = keys[1]
    lay = LAYOUT[victim]
    d = Damaged(DATA)
    cap = lay["headers"][-1]                       # caption.txt header of the victim
    block = bytearray(DATA[cap:cap + BLOCK])
    size = lay["members"]["caption.txt"][1]
    if case == "size_grew_in_block":               # NULs of the padding would pass for caption text
        block[124:136] = b"%011o\0" % (size + 3)
    elif case == "size_shrank":
        block[124:136] = b"%011o\0" % (size - 3)
    elif case == "unknown_type":
        block[156:157] = b"Q"
    elif case == "not_octal":
        block[136:148] = b"12345678x01\0"          # mtime
    if case in ("size_grew_in_block", "size_shrank", "unknown_type", "not_octal"):
        _checksum(block)
        d.write(cap, bytes(block))
    elif case == "zero_header":
        d.write(lay["headers"][3], bytes(BLOCK))
    else:
        d.splice(len(DATA), 0, b"\x01garbage" * 50)
    damage: list[Damage] = []
    got = {s["__key__"]: s for s in iter_samples(bytes(d.buf), "s.tar", damage.append)}
    good = {k for k, s in got.items() if _decodes(s)}
    if case == "trailing":
        assert good == set(keys) and "after the end" in damage[0].reason
    else:
        assert good == set(keys) - {victim}, (case, [str(x) for x in damage])
        assert any(x.dropped and x.key == victim for x in damage) or victim in got, case


def _decodes(s) -> bool:
    try:
        schema.decode_sample(s)
        return True
    except schema.SchemaError:
        return False


def test_inspect_and_stats_read_a_damaged_shard_through_the_same_reader(tmp_path, capsys):
    """mdv2-stats counts the intact samples of a damaged shard and names the damage (exit 1); a flipped payload
    byte, invisible to a tar reader, shows as a sha256 mismatch; mdv2-inspect shows an intact sample and warns."""
    from pipeline.contract import manifest
    from pipeline.contract.shardio import sha256_bytes
    from pipeline.tools import inspect, stats
    keys = list(LAYOUT)
    rel = [schema.shard_path("train", 32, 64, 1, i) for i in range(2)]
    records = []
    for r in rel:
        (tmp_path / r).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / r).write_bytes(DATA)
        records.append(manifest.ShardRecord(r, "train", "32x64_t1", 32, 64, 1, 4, len(DATA), sha256_bytes(DATA),
                                            schema.SCHEMA_VERSION, "cfg", keys))
    manifest.write_manifest(str(tmp_path), "train", records)
    bad = bytearray(DATA)
    bad[LAYOUT[keys[1]]["headers"][2] + 130] ^= 0x21        # the size field of the second sample's third member
    (tmp_path / rel[0]).write_bytes(bytes(bad))
    flipped = bytearray(DATA)
    a, size = LAYOUT[keys[0]]["members"]["latent_mean.npy"]
    flipped[a + size - 1] ^= 0x01                           # the last byte of a latent
    (tmp_path / rel[1]).write_bytes(bytes(flipped))
    assert stats.main([str(tmp_path), "--no-progress"]) == 1
    j = __import__("json").loads((tmp_path / stats.STATS_JSON).read_text())
    assert j["samples_read"] == 7                            # 3 intact + 4 (the flip is inside a payload)
    assert any(m.startswith(f"{rel[0]}: damaged, 1 samples dropped ['{keys[1]}']") for m in j["mismatches"])
    assert any(m.startswith(f"{rel[1]}: sha256 differs") for m in j["mismatches"])
    capsys.readouterr()
    sample = inspect.load_sample(str(tmp_path / rel[0]), keys[2])
    assert sample.key == keys[2] and "bad header" in capsys.readouterr().err
    assert inspect.main([str(tmp_path / rel[0]), "--key", keys[1]]) == 2
    assert f"sample {keys[1]!r} is damaged in the shard" in capsys.readouterr().err
