"""Stage configs and the clip index: counts per bucket from a scene of known length."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.contract import schema
from pipeline.scenes.buckets import (BucketSpec, StageConfig, clip_counts, load_stage, longest_valid_run, make_clip_index,
                              read_clip_index, write_clip_index)
from pipeline.scenes.scenestore import SceneArrays

VIEWS = list(schema.VIEWS)


def _scene(name="scene-a", frames=100, key_every=6, bad=(), size=(400, 225)):
    f, v = frames, len(VIEWS)
    ok = np.ones((f, v), bool)
    for i, j in bad:
        ok[i, j] = False
    return SceneArrays(
        scene_name=name, scene_token="tok-" + name, split="train", dataset="v1.0-synth", description="",
        map_name="boston-seaport", views=VIEWS, image_size=size,
        timestamps_us=np.arange(f, dtype=np.int64) * 83_333, keyframe=(np.arange(f) % key_every) == 0,
        frame_paths=np.array([[f"samples/{c}/{name}_{i:04d}.jpg" for c in VIEWS] for i in range(f)]),
        frame_ok=ok, fill_from=np.where(ok, np.arange(f)[:, None], -1), gap=np.zeros(f, bool),
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


def test_clips_with_bad_frames_are_quarantined():
    stage = StageConfig("t", [BucketSpec(64, 128, 1, 4), BucketSpec(64, 128, 9, 2), BucketSpec(64, 128, "full", 1)])
    quarantine = []
    table = make_clip_index([_scene(bad=[(13, 3), (61, 0)])], stage, quarantine)
    counts = clip_counts(table)
    assert counts["64x128_t1"] == 17 and counts["64x128_t9"] == 11 - 2   # clips 9-17 and 54-62 dropped
    assert {q.item for q in quarantine} == {schema.sample_key("scene-a", 9, 9, 64, 128),
                                            schema.sample_key("scene-a", 54, 9, 64, 128)}
    assert "frame 13 CAM_BACK_RIGHT" in quarantine[0].detail
    # longest usable run: frames 14..60 (47 frames) -> 41 = 8*5+1
    assert longest_valid_run(np.arange(100) < 0) == (0, 0)
    full = [r for r in table.to_pylist() if r["bucket"] == "64x128_tfull"]
    assert [(r["start"], r["num_frames"]) for r in full] == [(14, 41)]


def test_too_small_images_are_reported():
    quarantine = []
    table = make_clip_index([_scene(size=(400, 100))], StageConfig("t", [BucketSpec(64, 128, 1, 4)]), quarantine)
    assert table.num_rows == 0 and quarantine[0].reason == "image_too_small"
