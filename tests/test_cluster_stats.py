"""pipeline/tools/stats.py on factory shards whose contents are known by construction (tests/factories.py):
every sample has 5 boxes of classes 0..4 (car, truck, construction_vehicle, bus, trailer); the last one
(trailer) leaves at frame T // 2, so a T=9 clip has 5 objects in frames 0-3 and 4 in frames 4-8, and a
T=1 clip has 4 objects."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from factories import make_sample, write_shards
from pipeline.contract import manifest, schema
from pipeline.tools import stats, viewstats
from pipeline.contract.shardio import iter_shard, sha256_bytes, write_shard


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


# ---- per-view statistics of the schema-2.0 time model (pipeline/tools/viewstats.py) -------------------------------

# view -> (shutter offset from CAM_FRONT in ms, metres its box of object n moves per (n + 1)); CAM_FRONT is the reference
RIG = {"CAM_FRONT": (0, 0.0), "CAM_FRONT_RIGHT": (12, 0.1), "CAM_BACK_RIGHT": (35, 0.3), "CAM_BACK": (25, 0.2),
       "CAM_BACK_LEFT": (-3, 0.05), "CAM_FRONT_LEFT": (-8, 0.15)}


def _timed_sample(start: int) -> dict:
    """A factory sample (T=9, 5 objects; object 4 leaves at frame 4) with a known time model: view v
    (index v of schema.VIEWS) fires RIG offset + (t % 3) ms after CAM_FRONT (CAM_FRONT exactly at the frame
    time), sees objects n < v, and its box of object n sits RIG step * (n + 1) m from the reference box."""
    s = make_sample(start=start, num_frames=9, num_boxes=5, seed=start)
    t_, v_, n_ = s["view_boxes"].shape[:3]
    ts = s["meta"]["timestamps_us"]
    jitter = [0 if name == schema.REFERENCE_VIEW else 1 for name in schema.VIEWS]
    s["meta"]["view_timestamps_us"] = [[ts[t] + 1000 * (RIG[name][0] + jitter[v] * (t % 3))
                                        for v, name in enumerate(schema.VIEWS)] for t in range(t_)]
    step = np.array([RIG[name][1] for name in schema.VIEWS])
    vb = np.repeat(s["boxes"][:, None], v_, axis=1)                                   # (T, V, N, 7)
    vb[..., 0] += step[None, :, None] * (np.arange(n_) + 1)[None, None, :]
    present = np.broadcast_to(s["box_mask"][:, None, :], (t_, v_, n_))
    vb[~present] = 0.0
    s["view_boxes"] = vb.astype(np.float32)
    s["box_view_mask"] = present & (np.arange(n_)[None, None, :] < np.arange(v_)[None, :, None])
    return s


def test_stats_per_view_time_model(tmp_path, capsys):
    out = tmp_path / "out"
    paths = []
    for i, start in enumerate((0, 20)):
        s = _timed_sample(start)
        p = out / schema.shard_path("train", 64, 128, 9, i)
        write_shard(p, [(s["key"], schema.encode_sample(s))])
        paths.append(p)
    _manifest_for(out, paths, "train")
    assert stats.main([str(out), "--no-progress"]) == 0
    j = json.loads((out / stats.STATS_JSON).read_text())["views"]
    assert j["samples"] == 2 and j["order"] == list(schema.VIEWS)
    for v, name in enumerate(schema.VIEWS):
        got = j["per_view"][name]
        # frames 0-3 hold 5 objects, frames 4-8 hold 4; view v sees the first v of them
        assert got["frames"] == 18 and got["visible_box_frames"] == 2 * (4 * min(v, 5) + 5 * min(v, 4))
        # offsets over t = 0..8: the RIG offset + 0, 1, 2 ms (three frames each); CAM_FRONT exactly 0
        lo, step = RIG[name]
        assert got["exposure_offset_ms"] == ({"median": 0.0, "min": 0.0, "max": 0.0} if name == "CAM_FRONT" else
                                             {"median": lo + 1.0, "min": lo, "max": lo + 2.0})
        # displacements step x (1, 2, 3, 4) in all 9 frames and step x 5 in frames 0-3: 40 per sample;
        # nearest rank: median = 3rd value (cumulative 9, 18, 27 of 40), p95 = 5th (rank 38 > 36)
        d = got["displacement_m"]
        assert d["objects"] == 80
        assert (d["median"], d["p95"], d["max"]) == pytest.approx((3 * step, 5 * step, 5 * step), abs=1e-3)
    md = (out / stats.STATS_MD).read_text()
    assert "| CAM_BACK_RIGHT | 54 | 3.0 | 36.0 | 35.0 | 37.0 | 0.9 | 1.5 | 1.5 |" in md
    assert "| CAM_FRONT | 18 | 1.0 | 0.0 | 0.0 | 0.0 | 0.0 | 0.0 | 0.0 |" in md


def test_stats_refuses_shards_without_view_members(tmp_path, capsys):
    s = make_sample()
    members = {k: v for k, v in schema.encode_sample(s).items() if k != "view_boxes.npy"}  # as a 1.x shard
    p = tmp_path / schema.shard_path("train", 64, 128, 9, 0)
    write_shard(p, [(s["key"], members)])
    _manifest_for(tmp_path, [p], "train")
    assert stats.main([str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'view_boxes.npy': missing" in err and "rebuild the shards" in err


def test_nearest_rank_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.integers(-50, 50, 1001)
    vals, cnts = np.unique(x, return_counts=True)
    for q in (0.0, 0.1, 0.5, 0.95, 1.0):
        assert viewstats.nearest_rank(vals, cnts, q) == np.quantile(x, q, method="inverted_cdf")
