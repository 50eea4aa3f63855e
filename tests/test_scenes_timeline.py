"""Timestamp matching with damaged data (on a private copy of the synthetic dataset): a deleted sweep
file, a removed sample_data record, a dropped reference frame -> flagged and repaired, their clips kept; a round
no camera recorded -> a gap, the clips spanning it quarantined with a clear report."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.contract import schema
from pipeline.scenes.buckets import read_clip_index
from pipeline.contract.manifest import read_quarantine
from pipeline.scenes.nuscenes import build_timeline, load_nuscenes
from pipeline.scenes.run import ScenesConfig, process_scenes, write_quarantine
from tests.factories_scenes import copy_dataset


def _remove_record(table_dir, filename_part):
    """Drop one sample_data record (relinking its neighbours, as if it had never been recorded)."""
    path = table_dir / "sample_data.json"
    rows = json.loads(path.read_text())
    victim = next(r for r in rows if filename_part in r["filename"])
    by_tok = {r["token"]: r for r in rows}
    if victim["prev"]:
        by_tok[victim["prev"]]["next"] = victim["next"]
    if victim["next"]:
        by_tok[victim["next"]]["prev"] = victim["prev"]
    path.write_text(json.dumps([r for r in rows if r is not victim]))
    return victim


@pytest.fixture(scope="module")
def damaged(synth_dataset, tmp_path_factory):
    root = copy_dataset(synth_dataset.root, tmp_path_factory.mktemp("damaged") / "data")
    nusc = load_nuscenes(str(synth_dataset.root), synth_dataset.version)
    scene = synth_dataset.scene_names[0]
    tl = build_timeline(nusc, scene)
    v = tl.views.index
    # frame 30: delete the CAM_BACK sweep file; frame 40: remove the CAM_FRONT_LEFT record;
    # frame 50: remove a CAM_FRONT (reference) record; frame 60: remove every camera's record (a gap)
    assert not tl.keyframe[[30, 40, 50, 60]].any()
    (root / tl.frame_paths[30, v("CAM_BACK")]).unlink()
    _remove_record(root / synth_dataset.version, tl.frame_paths[40, v("CAM_FRONT_LEFT")])
    _remove_record(root / synth_dataset.version, tl.frame_paths[50, v("CAM_FRONT")])
    for name in tl.views:
        _remove_record(root / synth_dataset.version, tl.frame_paths[60, v(name)])
    return root, synth_dataset, scene, tl


def test_damage_is_flagged_and_repaired_at_the_right_frames(damaged):
    root, info, scene, clean = damaged
    tl = build_timeline(load_nuscenes(str(root), info.version), scene)
    assert tl.num_frames == clean.num_frames - 1            # only the round no camera recorded is gone
    bad = {(p.frame, p.view, p.reason) for p in tl.problems}
    # CAM_FRONT_LEFT's neighbours belong to the rounds 50-100 ms away, beyond the 20 ms window of this
    # round ("no_match"); with a window wide enough to reach them, the neighbour is "reused"
    assert bad == {(30, "CAM_BACK", "file_missing"), (40, "CAM_FRONT_LEFT", "no_match"),
                   (50, "CAM_FRONT", "no_match"), (60, "CAM_FRONT", "gap")}, tl.problems
    assert (~tl.frame_ok).sum() == 3 and tl.gap.tolist() == [i == 60 for i in range(tl.num_frames)]
    v = tl.views.index
    for frame, view in ((30, "CAM_BACK"), (40, "CAM_FRONT_LEFT"), (50, "CAM_FRONT")):
        p = next(p for p in tl.problems if p.frame == frame and p.view == view)
        k = p.filled_from
        assert abs(k - frame) == 1 and tl.fill_from[frame, v(view)] == k and "repaired with its frame" in p.detail
        assert tl.frame_paths[frame, v(view)] == clean.frame_paths[k, v(view)]     # the neighbour's image ...
        assert tl.view_timestamps_us[frame, v(view)] == clean.view_timestamps_us[k, v(view)]   # ... at its time
    wide = build_timeline(load_nuscenes(str(root), info.version), scene, tolerance_s=0.1)
    p = next(p for p in wide.problems if p.frame == 40)
    assert p.reason == "reused" and "already belongs to frame" in p.detail and not wide.frame_ok[40, 0]
    # the neighbour of the removed record keeps its own file
    assert tl.frame_paths[41, v("CAM_FRONT_LEFT")] == clean.frame_paths[41, v("CAM_FRONT_LEFT")]
    detail = next(p.detail for p in tl.problems if p.frame == 30)
    assert clean.frame_paths[30, v("CAM_BACK")] in detail and "absent" in detail
    # everything else matches the undamaged dataset; the rebuilt round 50 is timed by its LiDAR trigger
    np.testing.assert_array_equal(tl.timestamps_us[:50], clean.timestamps_us[:50])
    assert abs(tl.timestamps_us[50] - clean.timestamps_us[50]) < 1_000
    np.testing.assert_array_equal(tl.timestamps_us[51:60], clean.timestamps_us[51:60])
    np.testing.assert_array_equal(tl.timestamps_us[60:], clean.timestamps_us[61:])


def test_repaired_clips_are_kept_and_gap_clips_quarantined_with_a_clear_report(damaged, tmp_path):
    root, info, scene, _ = damaged
    out = str(tmp_path / "out")
    res = process_scenes(ScenesConfig(dataroot=str(root), version=info.version, out=out, stage="demo",
                                      scenes=[scene], progress=False))
    write_quarantine(out, res.quarantine)
    q = read_quarantine(out)
    assert {r.stage for r in q} == {"scenes"}
    items = {r.item: r for r in q}
    # the gap itself, and the 64x128 9-frame clips (stride 8) spanning it: 56 (56-64)
    assert items[f"{scene}/frame0060/CAM_FRONT"].reason == "gap"
    key = schema.sample_key(scene, 56, 9, 64, 128)
    assert items[key].reason == "gap" and items[key].detail == "no camera recorded the round before frame 60"
    assert not any("frame0030" in k or "frame0040" in k or "frame0050" in k for k in items)   # repaired: not lost
    keys = set(read_clip_index(out).column("key").to_pylist())
    for start in (24, 40, 48):   # they hold the repaired frames 30, 40 and 50
        assert schema.sample_key(scene, start, 9, 64, 128) in keys
    assert key not in keys
