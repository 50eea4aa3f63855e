"""Stage configs and the clip index: counts per bucket from a scene of known length."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.contract import schema
from pipeline.scenes.buckets import (BucketSpec, StageConfig, clip_counts, load_stage, longest_valid_run, make_clip_index,
                              read_clip_index, write_clip_index)
from pipeline.scenes.clipyield import YieldReport
from pipeline.scenes.rounds import nearest_fill
from pipeline.scenes.scenestore import SceneArrays

VIEWS = list(schema.VIEWS)


def _scene(name="scene-a", frames=100, key_every=6, bad=(), size=(400, 225), gaps=(), blind=()):
    """A scene of known length; ``bad``: (frame, view) images not recorded (repaired from the nearest round),
    ``gaps``: frames after a round no camera recorded, ``blind``: views without any image."""
    f, v = frames, len(VIEWS)
    ok = np.ones((f, v), bool)
    for i, j in bad:
        ok[i, j] = False
    for j in blind:
        ok[:, j] = False
    ts = np.arange(f, dtype=np.int64)[:, None] * 83_333 + np.arange(v) * 5_000
    gap = np.isin(np.arange(f), gaps)
    return SceneArrays(
        scene_name=name, scene_token="tok-" + name, split="train", dataset="v1.0-synth", description="",
        map_name="boston-seaport", views=VIEWS, image_size=size,
        timestamps_us=np.arange(f, dtype=np.int64) * 83_333, keyframe=(np.arange(f) % key_every) == 0,
        frame_paths=np.array([[f"samples/{c}/{name}_{i:04d}.jpg" for c in VIEWS] for i in range(f)]),
        frame_ok=ok, fill_from=nearest_fill(ok, ts, ts), gap=gap,
        source_sizes=np.tile(np.array(size), (v, 1)),
        lidar2global=np.tile(np.eye(4), (f, 1, 1)), intrinsics=np.tile(np.eye(3), (v, 1, 1)),
        cam2lidar=np.tile(np.eye(4), (f, v, 1, 1)),
        view_timestamps_us=np.arange(f, dtype=np.int64)[:, None] * 83_333 + np.arange(v) * 5_000, box_class=np.zeros(0, np.int8), box_track=np.zeros(0, np.int32),
        instance_tokens=np.zeros(0, str), num_scene_frames=f)


def test_paper_stages_load():
    s3 = load_stage("stage3")
    assert {b.name for b in s3.buckets} >= {"224x400_tfull", "424x800_t129", "848x1600_t33"}
    assert [b.num_frames for b in load_stage("stage1").buckets] == [1]
    s2 = load_stage("stage2")
    assert sorted(b.num_frames for b in s2.buckets if b.height == 224) == [1, 9, 17, 33, 65]
    assert sorted(b.num_frames for b in s2.buckets if b.height == 424) == [1, 9, 17, 33]
    demo = load_stage("demo")
    assert all(b.height % 16 == 0 and b.width % 16 == 0 and round(225 * b.width / 400) >= b.height
               for b in demo.buckets)


def test_bad_stage_files_are_refused(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("buckets:\n  - {height: 64, width: 128, num_frames: 8, batch_size: 1}\n")
    with pytest.raises(ValueError, match="8k\\+1"):
        load_stage(str(p))
    with pytest.raises(FileNotFoundError, match="known stages"):
        load_stage("nope")


def test_clip_counts_for_a_scene_of_known_length(tmp_path):
    stage = StageConfig("t", [BucketSpec(64, 128, 1, 4), BucketSpec(64, 128, 9, 2), BucketSpec(64, 128, 17, 1),
                              BucketSpec(80, 144, 9, 1, stride=4), BucketSpec(64, 128, "full", 1)])
    quarantine = []
    table = make_clip_index([_scene()], stage, quarantine)
    # 100 frames, keyframes 0, 6, ..., 96 -> 17 images; 9-frame clips at 0, 9, ..., 90 -> 11;
    # 17-frame clips at 0, 17, ..., 68 -> 5; stride 4: starts 0..88 -> 23; full: 97 = 8*12+1 frames
    assert clip_counts(table) == {"64x128_t1": 17, "64x128_t9": 11, "64x128_t17": 5, "80x144_t9": 23,
                                  "64x128_tfull": 1}
    assert not quarantine
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == sorted(r["key"] for r in rows)
    full = next(r for r in rows if r["bucket"] == "64x128_tfull")
    assert full["num_frames"] == 97 and full["start"] == 0 and full["middle_frame"] == 48
    clip = next(r for r in rows if r["key"] == schema.sample_key("scene-a", 9, 9, 64, 128))
    assert len(clip["frames"]) == 9 and len(clip["frames"][0]) == 6 and clip["middle_frame"] == 13
    assert clip["frames"][0][1] == "samples/CAM_FRONT/scene-a_0009.jpg"
    assert clip["middle_frame_paths"] == clip["frames"][4]
    write_clip_index(table, str(tmp_path))
    assert read_clip_index(str(tmp_path)).equals(table)


def test_repaired_frames_are_kept_and_only_long_runs_and_gaps_lose_clips():
    stage = StageConfig("t", [BucketSpec(64, 128, 1, 4), BucketSpec(64, 128, 9, 2), BucketSpec(64, 128, "full", 1)])
    quarantine, report = [], YieldReport()
    # a single drop at 13, a run of 2 at 30-31, a run of 3 at 61-63 (max_fill_run 2), a hole before frame 80
    bad = [(13, 3), (30, 1), (31, 1), (61, 0), (62, 0), (63, 0)]
    table = make_clip_index([_scene(bad=bad, gaps=[80])], stage, quarantine, report)
    starts = sorted(r["start"] for r in table.to_pylist() if r["bucket"] == "64x128_t9")
    # 9-frame clips every 9 frames; the one at 54 (54-62) would hold the run of 3: it moves past it to 64; the
    # next one at 73 (73-81) would span the hole before 80: it moves to 80; then 89. 100 frames leave no room for
    # the two clips the moves cost (11 possible, 9 kept)
    assert starts == [0, 9, 18, 27, 36, 45, 64, 80, 89]
    assert clip_counts(table)["64x128_t1"] == 17
    assert {(q.item, q.reason) for q in quarantine} == {(schema.sample_key("scene-a", 54, 9, 64, 128), "fill_run"),
                                                        (schema.sample_key("scene-a", 73, 9, 64, 128), "gap")}
    detail = {q.item: q.detail for q in quarantine}
    assert detail[schema.sample_key("scene-a", 54, 9, 64, 128)] == \
        "CAM_FRONT_LEFT misses frames 61-63 (3 consecutive > max_fill_run 2)"
    assert detail[schema.sample_key("scene-a", 73, 9, 64, 128)] == "no camera recorded the round before frame 80"
    y = report.buckets["64x128_t9"]
    # repaired: 9 (frame 13) and 27 (30-31: two view-frames)
    assert (y.possible, y.kept, y.repaired, y.filled, y.moved, y.lost) == (11, 9, 2, 3, 3, {"fill_run": 1, "gap": 1})
    # longest usable stretch: frames 0..60 (the run at 61-63 and the hole before 80 split the rest) -> 57
    assert longest_valid_run(np.arange(100) < 0) == (0, 0)
    full = [r for r in table.to_pylist() if r["bucket"] == "64x128_tfull"]
    assert [(r["start"], r["num_frames"]) for r in full] == [(0, 57)]
    assert report.buckets["64x128_tfull"].repaired == 1 and report.buckets["64x128_tfull"].filled == 3
    assert report.warnings() == []


def test_clips_without_anything_to_dodge_stay_on_their_stride():
    """No drops: the placement is clip_starts exactly (the clip index of a clean scene does not change)."""
    stage = StageConfig("t", [BucketSpec(64, 128, 9, 2), BucketSpec(80, 144, 9, 1, stride=4)])
    rows = make_clip_index([_scene()], stage).to_pylist()
    assert sorted(r["start"] for r in rows if r["bucket"] == "64x128_t9") == list(range(0, 92, 9))
    assert sorted(r["start"] for r in rows if r["bucket"] == "80x144_t9") == list(range(0, 92, 4))


def test_a_camera_without_images_loses_every_clip_and_warns():
    stage = StageConfig("t", [BucketSpec(64, 128, 9, 2)])
    quarantine, report = [], YieldReport()
    assert make_clip_index([_scene(blind=[4])], stage, quarantine, report).num_rows == 0
    assert quarantine[0].detail == "CAM_BACK misses frames 0-99 (no image of this camera to repair them from)"
    (line,) = report.warnings()
    assert line == "warning: bucket 64x128_t9 would be EMPTY (11 possible; lost: fill_run 11)"


def test_yield_warns_below_a_tenth_and_max_fill_run_is_a_stage_setting(tmp_path):
    report = YieldReport()
    runs = [(a + i, 2) for a in range(5, 90, 10) for i in range(3)]        # runs of 3 up to frame 87
    make_clip_index([_scene(bad=runs)], StageConfig("t", [BucketSpec(64, 128, 9, 1, stride=1)]), None, report)
    y = report.buckets["64x128_t9"]
    assert (y.possible, y.kept) == (92, 4)                                    # starts 88..91 only
    (line,) = report.warnings()
    assert line == "warning: bucket 64x128_t9 keeps 4 of 92 possible clips (4.3% < 10%; lost: fill_run 88)"
    assert report.buckets["64x128_t9"].moved == 0                  # stride 1: every start is a nominal one
    p = tmp_path / "s.yaml"
    p.write_text("max_fill_run: 0\nbuckets:\n  - {height: 64, width: 128, num_frames: 9, batch_size: 1}\n")
    assert load_stage(str(p)).max_fill_run == 0 and load_stage("stage3").max_fill_run == 2
    p.write_text("max_fill_run: -1\nbuckets:\n  - {height: 64, width: 128, num_frames: 9, batch_size: 1}\n")
    with pytest.raises(ValueError, match="max_fill_run"):
        load_stage(str(p))


def test_too_small_images_are_reported():
    quarantine = []
    table = make_clip_index([_scene(size=(400, 100))], StageConfig("t", [BucketSpec(64, 128, 1, 4)]), quarantine)
    assert table.num_rows == 0 and quarantine[0].reason == "image_too_small"
