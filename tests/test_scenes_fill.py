"""Dropped images repaired, not discarded: a synthetic scene with known drops (a single one, one at CAM_FRONT
together with CAM_FRONT_LEFT, a burst of 2 and a burst of 3). The fill mask is exactly the dropped set, every
filled view-frame's boxes land on the object in the image actually used (synth_truth.parquet), every clip whose
views miss at most 2 consecutive frames is kept, and the run of 3 quarantines its clips, naming the frames."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.contract import schema
from pipeline.scenes.buckets import BucketSpec, StageConfig, make_clip_index
from pipeline.scenes.clipyield import YieldReport
from pipeline.scenes.nuscenes import build_timeline, load_nuscenes
from pipeline.scenes.run import ScenesConfig, process_scenes
from pipeline.scenes.scenestore import open_scene_store
from pipeline.shards.clips import assemble_sample, clip_geometry
from pipeline.synth.writer import keyframe_indices, write_dataset
from pipeline.tools.boxcheck import projection_errors, summary, truth_at_views

# seed 1: a scene whose unfilled view-frames meet the suite's p95 <= 1 px bound on their own (seed 0's first
# scene alone is at 1.12 px, the interpolation error of its movers; the 2-scene suite dataset is at 0.73 px)
SEED, SECONDS = 1, 6.0


def _runs_of_non_keyframes(kf: np.ndarray, n: int, length: int, after: int) -> int:
    """The first frame > ``after`` starting ``length`` consecutive non-keyframes (with a recorded frame around)."""
    key = np.isin(np.arange(n), kf)
    return next(a for a in range(after + 1, n - length - 1) if not key[a - 1:a + length + 1].any())


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    n = int(round(SECONDS * schema.FPS))
    kf = keyframe_indices(np.random.default_rng([SEED, 0]), n, (4, 7))   # the writer's first draw for scene 0
    single = _runs_of_non_keyframes(kf, n, 1, 5)
    front = _runs_of_non_keyframes(kf, n, 1, single + 4)
    two = _runs_of_non_keyframes(kf, n, 2, front + 4)
    three = _runs_of_non_keyframes(kf, n, 3, two + 5)
    drops = {"CAM_FRONT_RIGHT": [single], "CAM_FRONT": [front], "CAM_FRONT_LEFT": [front],
             "CAM_BACK": [two, two + 1], "CAM_BACK_LEFT": [three, three + 1, three + 2]}
    info = write_dataset(tmp_path_factory.mktemp("fill") / "data", scenes=1, seconds=SECONDS, image_size=(400, 225),
                         seed=SEED, drop_rate=0.0, drops=drops)
    out = tmp_path_factory.mktemp("fill_out")
    res = process_scenes(ScenesConfig(dataroot=str(info.root), version=info.version, out=str(out), stage=None,
                                      progress=False))
    sa = open_scene_store(res.summaries[0]["uri"])
    dropped = {(f, schema.VIEWS.index(ch)) for ch, fs in drops.items() for f in fs}
    return info, sa, drops, dropped, (single, front, two, three), res


def test_fill_mask_is_exactly_the_dropped_set(known):
    info, sa, drops, dropped, (single, front, two, three), res = known
    n = int(round(SECONDS * schema.FPS))
    assert sa.num_frames == n                      # the round whose CAM_FRONT image was dropped is kept
    assert {(int(i), int(j)) for i, j in zip(*np.nonzero(~sa.frame_ok))} == dropped
    full = clip_geometry(sa, 0, n, 64, 128)["fill_mask"]
    assert {(int(i), int(j)) for i, j in zip(*np.nonzero(full))} == dropped
    v = schema.VIEWS.index
    # each fill is the nearest recorded round of the same camera (a run of 2: each end takes its own side)
    assert sa.fill_from[single, v("CAM_FRONT_RIGHT")] in (single - 1, single + 1)
    assert sa.fill_from[two, v("CAM_BACK")] == two - 1 and sa.fill_from[two + 1, v("CAM_BACK")] == two + 2
    assert sa.fill_from[three, v("CAM_BACK_LEFT")] == three - 1
    assert sa.fill_from[three + 2, v("CAM_BACK_LEFT")] == three + 3
    for t, j in dropped:   # the used image's path, exposure and extrinsics are the source round's
        k = sa.fill_from[t, j]
        assert sa.frame_paths[t, j] == sa.frame_paths[k, j] and sa.view_timestamps_us[t, j] == sa.view_timestamps_us[k, j]
    # the rebuilt CAM_FRONT round: timed by its LiDAR trigger, within the rig's jitter of the true exposure
    truth = pq.read_table(info.truth_path, columns=["channel", "frame_index", "timestamp_us"]).to_pandas()
    true_front = truth[truth.channel == "CAM_FRONT"].drop_duplicates().set_index("frame_index").timestamp_us
    assert abs(int(sa.timestamps_us[front]) - int(true_front[front])) < 1_000
    assert np.all(np.abs(sa.timestamps_us - true_front.sort_index().to_numpy()) < 1_000)
    # repaired problems are not quarantined: nothing is lost
    assert not res.quarantine, res.quarantine


def test_filled_boxes_land_on_the_object_in_the_image_actually_used(known):
    info, sa, drops, dropped, _, _ = known
    truth = pq.read_table(info.truth_path)
    g = clip_geometry(sa, 0, sa.num_frames, 900, 1600)             # the shard members at 1600 px width
    tokens = sa.instance_tokens[g["box_track"]]
    tr = truth_at_views(truth, sa.scene_name, tokens, sa.views, sa.view_timestamps_us)
    assert tr["found"].all()                                       # every used image has its truth rows
    e = projection_errors(g["view_boxes"], sa.view_box_mask[:, :, g["box_track"]], g["cam2lidar"], g["intrinsics"],
                          1600, 900, tr)
    filled = g["fill_mask"][e["frame"], e["view"]]
    s_fill = summary({k: v[filled] for k, v in e.items() if len(v) == len(filled)}, list(schema.VIEWS))
    s_rest = summary({k: v[~filled] for k, v in e.items() if len(v) == len(filled)}, list(schema.VIEWS))
    assert s_fill["all"]["n"] >= 20 and s_rest["all"]["n"] > 1000, (s_fill, s_rest)
    assert s_fill["all"]["p95"] <= 1.0 and s_rest["all"]["p95"] <= 1.0, (s_fill, s_rest)
    # exactly where the source round shows it: a filled view-frame's boxes, through its own extrinsics, project
    # onto the same pixels as the source round's (LiDAR(t) differs, the image and its exposure are the same)
    from pipeline.contract.geometry import invert_transform, project, transform_points
    for t, j in sorted(dropped):
        k = sa.fill_from[t, j]
        both = g["box_view_mask"][t, j] & g["box_view_mask"][k, j]
        uv = [project(transform_points(invert_transform(g["cam2lidar"][r, j].astype(np.float64)),
                                       g["view_boxes"][r, j, both, :3].astype(np.float64)), g["intrinsics"][j])[0]
              for r in (t, k)]
        np.testing.assert_allclose(uv[0], uv[1], atol=0.02)
    # the measurement tells a wrong repair apart: the same boxes against the image that was dropped (the
    # renderer's truth at that round's own exposure) are off by the ego's motion between the rounds
    expected = sa.view_timestamps_us.copy()
    rows = pq.read_table(info.truth_path, columns=["channel", "frame_index", "timestamp_us"]).to_pandas()
    at = {(c, int(f)): int(t) for c, f, t in zip(rows.channel, rows.frame_index, rows.timestamp_us)}
    for t, j in dropped:
        expected[t, j] = at[(schema.VIEWS[j], t)]
    wrong = projection_errors(g["view_boxes"], sa.view_box_mask[:, :, g["box_track"]], g["cam2lidar"],
                              g["intrinsics"], 1600, 900,
                              truth_at_views(truth, sa.scene_name, tokens, sa.views, expected))
    bad = g["fill_mask"][wrong["frame"], wrong["view"]]
    assert np.percentile(wrong["err_px"][bad], 95) > 3.0


def test_clips_with_runs_of_two_are_kept_and_a_run_of_three_is_quarantined(known):
    info, sa, drops, dropped, (single, front, two, three), _ = known
    stage = StageConfig("t", [BucketSpec(64, 128, 9, 1, stride=1), BucketSpec(64, 128, "full", 1)])
    quarantine, report = [], YieldReport()
    rows = make_clip_index([sa], stage, quarantine, report).to_pylist()
    kept = {r["start"] for r in rows if r["bucket"] == "64x128_t9"}
    run3 = set(range(three, three + 3))
    for s in range(sa.num_frames - 9 + 1):
        assert (s in kept) == (not run3 & set(range(s, s + 9))), s
    (lost,) = [q for q in quarantine if q.item.endswith("_009_64x128")]   # one refused window: the rest move past
    assert lost.reason == "fill_run" and lost.item == schema.sample_key(sa.scene_name, three - 8, 9, 64, 128)
    assert lost.detail == f"CAM_BACK_LEFT misses frames {three}-{three + 2} (3 consecutive > max_fill_run 2)"
    y = report.buckets["64x128_t9"]
    assert (y.possible, y.kept, y.lost) == (sa.num_frames - 8, len(kept), {"fill_run": 11})
    repaired = [s for s in kept if {f for f, _ in dropped} & set(range(s, s + 9))]
    assert y.repaired == len(repaired) > 20
    # the full clip is the longest stretch without the run of 3 (runs of 1 and 2 inside it are repaired)
    (full,) = [r for r in rows if r["bucket"] == "64x128_tfull"]
    before, after = three, sa.num_frames - three - 3
    assert (full["start"], full["num_frames"]) == ((0, (before - 1) // 8 * 8 + 1) if before >= after
                                                   else (three + 3, (after - 1) // 8 * 8 + 1))
    # a stricter stage: a single drop already loses its clips; a looser one keeps the run of 3
    strict = make_clip_index([sa], StageConfig("s", stage.buckets[:1], max_fill_run=0))
    assert strict.num_rows < len(kept)
    loose = make_clip_index([sa], StageConfig("l", stage.buckets[:1], max_fill_run=3))
    assert loose.num_rows == sa.num_frames - 8


def test_a_sample_with_filled_frames_meets_the_contract(known):
    info, sa, drops, dropped, (single, front, two, three), _ = known
    s, t, v = front - 4, 9, len(schema.VIEWS)
    lat = np.zeros((v, 16, schema.latent_frames(t), 8, 16), np.float16)
    d = assemble_sample(sa, s, t, 64, 128, lat, None, "a road", {"source": "dataset"},
                        {"name": "x", "scaling_factor": 1.0, "temporal_compression": 4, "spatial_compression": 8})
    members = schema.encode_sample(d)
    out = schema.decode_sample(members, d["key"])
    want = sorted([f - s, j] for f, j in dropped if s <= f < s + t)
    assert out.meta["filled"] == want and np.argwhere(out.fill_mask).tolist() == want
    assert [4, schema.VIEWS.index("CAM_FRONT")] in want
    # meta describes the image actually used: its path and its exposure
    for ti, j in want:
        k = sa.fill_from[s + ti, j]
        assert out.meta["frames"][ti][j] == sa.frame_paths[k, j]
        assert out.meta["view_timestamps_us"][ti][j] == int(sa.view_timestamps_us[k, j])
    assert out.meta["source_size"] == [[400, 225]] * v and out.meta["bev"] == {"cells": 200, "cell_m": 0.5}
    np.testing.assert_allclose(out.source_intrinsics, sa.intrinsics, rtol=1e-6)
    assert json.loads(members["meta.json"])["filled"] == want


def test_the_timeline_is_the_same_whatever_the_source(known):
    """The devkit tables give the same repaired timeline (the scene store above came from the table index)."""
    info, sa, *_ = known
    tl = build_timeline(load_nuscenes(str(info.root), info.version), sa.scene_name)
    np.testing.assert_array_equal(tl.fill_from, sa.fill_from)
    np.testing.assert_array_equal(tl.frame_paths.astype(str), sa.frame_paths)
    np.testing.assert_array_equal(tl.timestamps_us, sa.timestamps_us)
