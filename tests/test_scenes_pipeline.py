"""Scene processing end to end on the synthetic dataset: keyframes, interpolation accuracy, masking,
scene stores (skip/recompute, frame ranges), BEV vs devkit on the synthetic map, CLI."""
from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from pyquaternion import Quaternion

from pipeline.contract import schema
from pipeline.scenes.bevmap import bev_fast, bev_reference, per_class_iou
from pipeline.scenes.buckets import read_clip_index
from pipeline.contract.geometry import make_transform
from pipeline.scenes.interpolate import EXTRAPOLATE_US, errors_vs_truth, interpolate_boxes, load_keyframe_annotations
from pipeline.scenes.nuscenes import build_timeline, load_map, load_nuscenes, split_for_unlisted
from pipeline.scenes.run import ScenesConfig, main, process_scenes
from pipeline.scenes.scenestore import build_scene_store_status, open_scene_store

# Synthetic motion is constant speed v <= 10 m/s and constant yaw rate |w| <= 10 m/s * 0.0136 1/m (road
# curvature) + 0.015 = 0.151 rad/s (pipeline/synth/world.py). Keyframes are <= 7 rounds = 0.6 s apart;
# linear centre interpolation on that arc is off by at most the sagitta v*|w|*dt^2/8 = 0.068 m (the
# extrapolation over <= 83 ms beyond a track end adds v*|w|*0.68*0.083/2 = 4 mm at most there);
# slerp of a constant-rate yaw is exact; a 7-number box in the ~1 deg tilted LiDAR frame cannot hold that
# tilt, so the yaw taken back to the global frame is off by about tilt^2 / 2 ~ 1.2e-4 rad.
CENTRE_BOUND_M = 0.07
YAW_BOUND_RAD = 3e-4


@pytest.fixture(scope="module")
def built(synth_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes_out")
    res = process_scenes(ScenesConfig(dataroot=str(synth_dataset.root), version=synth_dataset.version,
                                      out=str(out), stage="demo", progress=False))
    return synth_dataset, out, res


def test_every_scene_has_a_complete_store(built):
    info, out, res = built
    assert [s["scene"] for s in res.summaries] == sorted(info.scene_names)
    assert not res.quarantine, res.quarantine
    for s in res.summaries:
        sc = open_scene_store(s["uri"])
        f, n, v = sc.num_frames, len(sc.box_class), len(sc.views)
        assert sc.views == list(schema.VIEWS) and sc.image_size == info.image_size
        assert f == 72 and sc.frame_ok.all() and sc.split == split_for_unlisted(sc.scene_name)
        assert sc.boxes.shape == (f, n, 7) and sc.boxes.dtype == np.float32
        assert sorted(sc.bev) == [200, 400]                            # every grid of schema.BEV_GRIDS
        assert sc.bev[200].shape == (f, 8, 200, 25) and sc.bev[200].dtype == np.uint8
        assert sc.bev[400].shape == (f, 8, 400, 50) and sc.bev[400].dtype == np.uint8
        assert sc.frame_paths.shape == (f, v) and sc.intrinsics.shape == (v, 3, 3)
        assert np.all(np.diff(sc.timestamps_us) > 0) and sc.keyframe[0] and sc.keyframe[-1]
        assert sc.box_mask.any() and (sc.box_class >= 0).all() and (sc.box_class < 10).all()


def test_annotations_are_placed_at_their_sample_time(built):
    """Independent path: the devkit's own Box/pyquaternion transforms of each annotation into the LiDAR at the
    sample's LIDAR_TOP pose; our interpolation evaluated at the sample timestamps reproduces them exactly."""
    from nuscenes.utils.data_classes import Box
    info, out, res = built
    nusc = load_nuscenes(str(info.root), info.version)
    sc = open_scene_store(res.summaries[0]["uri"])
    ann = load_keyframe_annotations(nusc, [s for s in build_timeline(nusc, sc.scene_name).sample_tokens if s])
    lidar_sd = [nusc.get("sample_data", nusc.get("sample", s)["data"]["LIDAR_TOP"]) for s in ann.sample_tokens]
    assert [sd["timestamp"] for sd in lidar_sd] == ann.key_ts.tolist()
    lidar_cs = nusc.get("calibrated_sensor", lidar_sd[0]["calibrated_sensor_token"])
    l2g = np.stack([make_transform(np.asarray(p["rotation"]), np.asarray(p["translation"])) for p in
                    (nusc.get("ego_pose", sd["ego_pose_token"]) for sd in lidar_sd)]) @ \
        make_transform(np.asarray(lidar_cs["rotation"]), np.asarray(lidar_cs["translation"]))
    ib = interpolate_boxes(ann, ann.key_ts, l2g)
    col = {t: i for i, t in enumerate(ann.instance_tokens)}
    checked = 0
    for k, s in enumerate(ann.sample_tokens):
        pose = nusc.get("ego_pose", lidar_sd[k]["ego_pose_token"])
        for tok in nusc.get("sample", s)["anns"]:
            a = nusc.get("sample_annotation", tok)
            if a["instance_token"] not in col:
                assert a["category_name"] not in schema.NUSCENES_CATEGORY_TO_CLASS
                continue
            box = Box(a["translation"], a["size"], Quaternion(a["rotation"]))
            box.translate(-np.array(pose["translation"]))
            box.rotate(Quaternion(pose["rotation"]).inverse)
            box.translate(-np.array(lidar_cs["translation"]))
            box.rotate(Quaternion(lidar_cs["rotation"]).inverse)   # the tilted LIDAR_TOP mount
            i = col[a["instance_token"]]
            assert ib.box_mask[k, i]
            np.testing.assert_allclose(ib.boxes[k, i, :3], box.center, atol=2e-5)
            np.testing.assert_array_equal(ib.boxes[k, i, 3:6], np.float32(a["size"]))
            r = box.rotation_matrix                                  # heading of the box's +x axis in LiDAR xy
            assert abs(np.angle(np.exp(1j * (ib.boxes[k, i, 6] - np.arctan2(r[1, 0], r[0, 0]))))) < 1e-6
            assert sc.box_class[i] == schema.CLASS_ID[schema.NUSCENES_CATEGORY_TO_CLASS[a["category_name"]]]
            assert ib.visibility[k, i] == int(a["visibility_token"]) and ib.num_lidar_pts[k, i] == a["num_lidar_pts"]
            checked += 1
    assert checked > 100
    # the store: no instance annotated at a keyframe is missing from that frame, in any view
    key_rows = np.flatnonzero(sc.keyframe)
    assert len(key_rows) == len(ann.key_ts)
    assert (sc.box_mask[key_rows] >= ann.present).all()
    assert (sc.view_box_mask[key_rows] >= ann.present[:, None]).all()


def test_interpolation_error_within_the_motion_bound(built):
    info, out, res = built
    truth = pq.read_table(info.truth_path)
    nusc = load_nuscenes(str(info.root), info.version)
    for s in res.summaries:
        sc = open_scene_store(s["uri"])
        e = errors_vs_truth(sc, truth)
        inter, moving = ~e["keyframe"], e["moving"]
        # moving objects between keyframes: where "hold the last keyframe" would be off by metres
        assert (inter & moving).sum() > 300 and e["travel"][inter & moving].min() > 1.0
        assert e["centre_err"][inter & moving].max() < CENTRE_BOUND_M, np.sort(e["centre_err"][inter & moving])[-5:]
        # every box, keyframes included (boxes are interpolated at CAM_FRONT's exposure there too)
        assert e["keyframe"].sum() > 100 and e["centre_err"].max() < CENTRE_BOUND_M
        assert e["yaw_err"].max() < YAW_BOUND_RAD
        # absent-object masking: a box exists only where the object really is there, or within one camera
        # period of its annotations (the documented extrapolation near track ends) ...
        ann = load_keyframe_annotations(nusc, [t for t in build_timeline(nusc, sc.scene_name).sample_tokens if t])
        extra = sc.box_mask & ~e["truth_present"]                                   # (F, N)
        dist = np.abs(sc.timestamps_us[:, None, None] - ann.key_ts[None, :, None]).astype(float)   # (F, K, 1)
        near_ann = np.where(ann.present[None], dist, np.inf).min(1) <= EXTRAPOLATE_US            # (F, N)
        assert not (extra & ~near_ann).any()
        # ... and objects that appear or leave between two keyframes are masked out around that time
        non_key = ~sc.keyframe
        assert (e["truth_present"] & ~sc.box_mask)[non_key].any()
        assert (sc.visibility[~sc.box_mask] == 0).all() and (sc.boxes[~sc.box_mask] == 0).all()


def test_store_is_skipped_when_unchanged_and_range_reads(built, tmp_path):
    info, out, res = built
    name = res.summaries[0]["scene"]
    private = tmp_path / "out"               # a private copy: the module's store stays as the other tests read it
    shutil.copytree(out, private)
    store = private / "_work" / "scenes"
    before = {p: p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}
    uri, computed = build_scene_store_status(str(info.root), info.version, name, str(private))
    assert not computed
    after = {p: p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}
    assert after == before                   # not a byte rewritten
    uri, computed = build_scene_store_status(str(info.root), info.version, name, str(private), tolerance_s=0.015)
    assert computed   # a setting of the inputs hash changed
    assert {p: p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()} != before
    whole = open_scene_store(uri)
    part = open_scene_store(uri, frames=slice(20, 37))
    assert part.frame_start == 20 and part.num_frames == 17 and part.num_scene_frames == whole.num_frames
    for cells in (200, 400):
        np.testing.assert_array_equal(part.bev[cells], whole.bev[cells][20:37])
    np.testing.assert_array_equal(part.boxes, whole.boxes[20:37])
    np.testing.assert_array_equal(part.view_boxes, whole.view_boxes[20:37])
    np.testing.assert_array_equal(part.cam2lidar, whole.cam2lidar[20:37])
    np.testing.assert_array_equal(part.frame_paths, whole.frame_paths[20:37])


def test_stores_of_the_old_time_model_are_recomputed(built, tmp_path, monkeypatch):
    from pipeline.scenes import scenestore
    info, out, res = built
    name = res.summaries[0]["scene"]
    monkeypatch.setattr(scenestore, "STORE_VERSION", "2")      # a store written by the schema-2 pipeline
    build_scene_store_status(str(info.root), info.version, name, str(tmp_path))
    monkeypatch.undo()
    uri, computed = build_scene_store_status(str(info.root), info.version, name, str(tmp_path))
    assert computed and open_scene_store(uri).view_boxes is not None


@pytest.mark.parametrize("cells", [200, 400])
def test_fast_bev_matches_devkit_on_the_synthetic_map(built, cells):
    """Both grids (200 x 0.5 m for 224x400, 400 x 0.25 m for 424x800 and 848x1600) against the devkit's
    get_map_mask at that canvas size."""
    info, out, res = built
    pick = slice(0, 72, 9)
    fast, ref = [], []
    for s in res.summaries:   # both scenes: each car park (with its hole) is in view for a few frames only
        sc = open_scene_store(s["uri"])
        nusc_map = load_map(str(info.root), sc.map_name)
        fast.append(bev_fast(nusc_map, sc.lidar2global[pick], cells=cells))
        np.testing.assert_array_equal(schema.pack_bev(fast[-1]), sc.bev[cells][pick])   # the store holds it
        ref.append(bev_reference(nusc_map, sc.lidar2global[pick], cells))
    iou = per_class_iou(np.concatenate(fast), np.concatenate(ref))
    # large polygons: >= 0.98; thin ones (walkways, crossings ~3 m, stop lines ~0.5 m wide) are capped
    # by the devkit's own +-0.25 m vertex rounding (see docs/scenes.md); lines are drawn differently
    for name in ("drivable_area", "carpark_area", "road_block"):
        assert iou[name] >= 0.98, iou
    for name in ("ped_crossing", "walkway"):
        assert iou[name] >= 0.93, iou
    assert iou["stop_line"] >= 0.65 and iou["lane_divider"] >= 0.75 and iou["road_divider"] >= 0.75, iou


def test_cli_prints_a_summary_and_writes_the_index(built, tmp_path, capsys):
    info, out, res = built
    assert main(["--dataroot", str(info.root), "--version", info.version, "--out", str(out), "--stage", "demo",
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "scenes: 2 (0 computed, 2 up to date)" in text and "frames: 144" in text and "64x128_t9: 16" in text
    assert main(["--dataroot", str(info.root), "--version", info.version, "--out", str(out), "--no-progress"]) == 0
    assert "scenes: 2 (0 computed, 2 up to date)" in capsys.readouterr().out
    table = read_clip_index(str(out))
    assert table.num_rows == sum(res.clip_counts.values())
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "12 Hz" in capsys.readouterr().out
