"""Timestamp matching with damaged data (on a private copy of the synthetic dataset): a deleted sweep
file, a removed sample_data record, a dropped reference frame -> flagged, reported, clips quarantined."""
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
    # frame 50: remove a CAM_FRONT (reference) record -> a gap in the timeline
    assert not tl.keyframe[[30, 40, 50]].any()
    (root / tl.frame_paths[30, v("CAM_BACK")]).unlink()
    _remove_record(root / synth_dataset.version, tl.frame_paths[40, v("CAM_FRONT_LEFT")])
    _remove_record(root / synth_dataset.version, tl.frame_paths[50, v("CAM_FRONT")])
    return root, synth_dataset, scene, tl


def test_damage_is_flagged_at_the_right_frames(damaged):
    root, info, scene, clean = damaged
    tl = build_timeline(load_nuscenes(str(root), info.version), scene)
    assert tl.num_frames == clean.num_frames - 1            # one reference frame fewer
    bad = {(p.frame, p.view, p.reason) for p in tl.problems}
    # CAM_FRONT_LEFT's neighbours belong to the rounds 50-100 ms away, beyond the 20 ms window of this
    # round ("no_match"); with a window wide enough to reach them, the neighbour is "reused"
    assert bad == {(30, "CAM_BACK", "file_missing"), (40, "CAM_FRONT_LEFT", "no_match"),
                   (50, "CAM_FRONT", "gap")}, tl.problems
    assert (~tl.frame_ok).sum() == 3
    wide = build_timeline(load_nuscenes(str(root), info.version), scene, tolerance_s=0.1)
    p = next(p for p in wide.problems if p.frame == 40)
    assert p.reason == "reused" and "already belongs to frame" in p.detail and not wide.frame_ok[40, 0]
    # the neighbour of the removed record is not silently reused: frame 41 keeps its own file
    v = tl.views.index("CAM_FRONT_LEFT")
    assert tl.frame_paths[41, v] == clean.frame_paths[41, v] and tl.frame_paths[40, v] == ""
    detail = next(p.detail for p in tl.problems if p.frame == 30)
    assert clean.frame_paths[30, tl.views.index("CAM_BACK")] in detail and "absent" in detail
    # everything else matches the undamaged dataset (frames after the gap shift by one)
    np.testing.assert_array_equal(tl.timestamps_us[:50], clean.timestamps_us[:50])
    np.testing.assert_array_equal(tl.timestamps_us[50:], clean.timestamps_us[51:])


def test_damaged_clips_are_quarantined_with_a_clear_report(damaged, tmp_path):
    root, info, scene, _ = damaged
    out = str(tmp_path / "out")
    res = process_scenes(ScenesConfig(dataroot=str(root), version=info.version, out=out, stage="demo",
                                      scenes=[scene], progress=False))
    write_quarantine(out, res.quarantine)
    q = read_quarantine(out)
    assert {r.stage for r in q} == {"scenes"}
    items = {r.item: r for r in q}
    assert f"{scene}/frame0030/CAM_BACK" in items and items[f"{scene}/frame0030/CAM_BACK"].reason == "file_missing"
    # the 64x128 9-frame clips (stride 8) starting at 24 and 40 hold frames 30 and 40: both excluded
    for start in (24, 40):
        key = schema.sample_key(scene, start, 9, 64, 128)
        assert items[key].reason == "frame_missing" and f"frame {30 if start == 24 else 40}" in items[key].detail
    keys = set(read_clip_index(out).column("key").to_pylist())
    assert schema.sample_key(scene, 24, 9, 64, 128) not in keys
    assert schema.sample_key(scene, 16, 9, 64, 128) in keys
