"""pipeline/stats.py on factory shards whose contents are known by construction (tests/factories.py):
every sample has 5 boxes of classes 0..4 (car, truck, construction_vehicle, bus, trailer); the last one
(trailer) leaves at frame T // 2, so a T=9 clip has 5 objects in frames 0-3 and 4 in frames 4-8, and a
T=1 clip has 4 objects."""
from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from factories import write_shards
from pipeline import manifest, schema, stats
from pipeline.shardio import iter_shard, sha256_bytes


def _manifest_for(out, paths, split):
    records = []
    for p in paths:
        data = p.read_bytes()
        keys = [k for k, _ in iter_shard(data)]
        rel = os.path.relpath(p, out)
        bucket = rel.split(os.sep)[1]
        h, w = (int(x) for x in bucket.split("_")[0].split("x"))
        t = int(bucket.split("_t")[1])
        records.append(manifest.ShardRecord(rel, split, bucket, h, w, t, len(keys), len(data), sha256_bytes(data),
                                            schema.SCHEMA_VERSION, "cfg", keys))
    manifest.write_manifest(str(out), split, records)
    return records


@pytest.fixture
def dataset(tmp_path):
    out = tmp_path / "out"
    train = write_shards(out, {(64, 128, 9): 5, (64, 128, 1): 3}, split="train", per_shard=2)
    val = write_shards(out, {(64, 128, 9): 2}, split="val", per_shard=4, caption="Rain.")
    _manifest_for(out, train, "train")
    _manifest_for(out, val, "val")
    return out


def test_stats_counts(dataset, capsys):
    assert stats.main([str(dataset), "--no-progress"]) == 0
    j = json.loads((dataset / stats.STATS_JSON).read_text())
    by = {(b["split"], b["bucket"]): b for b in j["buckets"]}
    assert set(by) == {("train", "64x128_t1"), ("train", "64x128_t9"), ("val", "64x128_t9")}
    assert [by[k]["samples"] for k in sorted(by)] == [3, 5, 2]
    assert [by[k]["shards"] for k in sorted(by)] == [2, 3, 1]
    assert by[("train", "64x128_t9")]["hours"] == pytest.approx(5 * 9 / 12 / 3600, abs=1e-6)
    assert by[("train", "64x128_t1")]["hours"] == pytest.approx(3 * 1 / 12 / 3600, abs=1e-6)
    assert j["samples_read"] == 10 and j["frames_read"] == 7 * 9 + 3
    assert j["class_objects"] == {"bus": 10, "car": 10, "construction_vehicle": 10, "trailer": 7, "truck": 10}
    assert j["class_box_frames"] == {"bus": 66, "car": 66, "construction_vehicle": 66, "trailer": 28, "truck": 66}
    assert j["objects_per_frame"]["histogram"] == {"4": 7 * 5 + 3, "5": 7 * 4}
    assert j["objects_per_frame"]["max"] == 5
    assert j["caption_words"]["max"] == 7 and j["caption_words"]["median"] == 7.0
    assert j["caption_words"]["mean"] == pytest.approx((8 * 7 + 2 * 1) / 10, abs=1e-3)
    assert j["caption_source"] == {"dataset": 10}
    md = (dataset / stats.STATS_MD).read_text()
    assert "| train | 64x128_t9 | 3 | 5 |" in md and "| **val** | all | 1 | 2 |" in md and "| trailer | 7 | 28 |" in md
    assert md == capsys.readouterr().out.split("written:")[0].rstrip("\n") + f"\n\n![charts]({stats.STATS_PNG})\n"
    with Image.open(dataset / stats.STATS_PNG) as im:
        assert im.format == "PNG" and im.size[0] > 400


def test_stats_deterministic(dataset, tmp_path):
    stats.main([str(dataset), "--no-progress", "--report-dir", str(tmp_path / "a")])
    stats.main([str(dataset), "--no-progress", "--report-dir", str(tmp_path / "b")])
    for name in (stats.STATS_MD, stats.STATS_JSON, stats.STATS_PNG):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_stats_reports_manifest_mismatch(dataset):
    records = manifest.read_manifest(str(dataset), "val")
    records[0].samples += 1
    manifest.write_manifest(str(dataset), "val", records)
    assert stats.main([str(dataset), "--no-progress"]) == 1
    j = json.loads((dataset / stats.STATS_JSON).read_text())
    assert j["mismatches"] == [f"{records[0].path}: manifest says 3 samples, shard holds 2"]


def test_stats_not_an_output_root(tmp_path, capsys):
    assert stats.main([str(tmp_path), "--no-progress"]) == 2
    assert "no <split>/manifest.parquet found" in capsys.readouterr().err
