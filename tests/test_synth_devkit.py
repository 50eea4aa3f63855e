"""The synthetic dataset through the real nuScenes devkit: loading, queries, rendering, structure."""
from __future__ import annotations

from collections import defaultdict

import matplotlib
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.contract import schema
from pipeline.synth.world import CAMERA_RIG

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def nusc(synth_dataset):
    from nuscenes.nuscenes import NuScenes
    return NuScenes(version=synth_dataset.version, dataroot=str(synth_dataset.root), verbose=False)


@pytest.fixture(scope="module")
def nmap(synth_dataset):
    from nuscenes.map_expansion.map_api import NuScenesMap
    return NuScenesMap(dataroot=str(synth_dataset.root), map_name=synth_dataset.map_name)


def _scene_samples(nusc, scene):
    out, tok = [], scene["first_sample_token"]
    while tok:
        out.append(nusc.get("sample", tok))
        tok = out[-1]["next"]
    return out


def _channel_frames(nusc, sample, channel):
    """All sample_data of a channel in the scene, following prev/next from the keyframe."""
    sd = nusc.get("sample_data", sample["data"][channel])
    while sd["prev"]:
        sd = nusc.get("sample_data", sd["prev"])
    frames = [sd]
    while frames[-1]["next"]:
        frames.append(nusc.get("sample_data", frames[-1]["next"]))
    return frames


def test_info_and_layout(synth_dataset, nusc):
    info = synth_dataset
    assert info.scene_names == ["synth-0000", "synth-0001"]
    assert info.map_name in schema.NUSCENES_MAPS
    assert [s["name"] for s in nusc.scene] == info.scene_names
    assert all(log["location"] == info.map_name for log in nusc.log)
    cams = [sd for sd in nusc.sample_data if sd["sensor_modality"] == "camera"]
    assert info.num_images == len(cams) == 2 * 72 * 6
    for sd in cams[:: 37]:
        path = info.root / sd["filename"]
        assert path.is_file() and path.read_bytes()[:2] == b"\xff\xd8"
        assert sd["filename"].startswith("samples/" if sd["is_key_frame"] else "sweeps/")
        assert (sd["width"], sd["height"]) == (400, 225)
    lidar = [sd for sd in nusc.sample_data if sd["channel"] == "LIDAR_TOP"]
    pts = np.fromfile(info.root / lidar[0]["filename"], dtype=np.float32).reshape(-1, 5)
    assert len(pts) > 0 and np.isfinite(pts).all()
    assert (info.root / nusc.map[0]["filename"]).is_file()


def test_devkit_queries_and_render(synth_dataset, nusc, tmp_path):
    sample = nusc.sample[4]
    path, boxes, k = nusc.get_sample_data(sample["data"]["CAM_FRONT"])
    assert k.shape == (3, 3) and abs(k[0, 0] - 1266.4 / 4) < 1e-3 and len(boxes) > 0
    sweep = nusc.get("sample_data", nusc.get("sample_data", sample["data"]["CAM_FRONT"])["next"])
    assert not sweep["is_key_frame"] and len(nusc.get_boxes(sweep["token"])) > 0
    moving = [a for a in sample["anns"] if nusc.get("sample_annotation", a)["category_name"] == "vehicle.car"]
    speeds = [np.linalg.norm(nusc.box_velocity(a)[:2]) for a in moving]
    assert any(np.isfinite(s) and s > 1.0 for s in speeds)
    out = tmp_path / "cam.png"
    nusc.render_sample_data(sample["data"]["CAM_FRONT"], out_path=str(out), verbose=False)
    assert out.stat().st_size > 1000
    import matplotlib.pyplot as plt
    plt.close("all")


def test_keyframes_about_2hz_with_4_to_7_frame_gaps(nusc):
    all_gaps = []
    for scene in nusc.scene:
        samples = _scene_samples(nusc, scene)
        assert scene["nbr_samples"] == len(samples) and samples[-1]["token"] == scene["last_sample_token"]
        frames = _channel_frames(nusc, samples[0], "CAM_FRONT")
        assert len(frames) == 72
        key_idx = [i for i, sd in enumerate(frames) if sd["is_key_frame"]]
        assert len(key_idx) == len(samples)
        gaps = np.diff(key_idx)
        assert set(gaps) <= {4, 5, 6, 7}
        all_gaps += gaps.tolist()
        dt = np.diff([s["timestamp"] for s in samples]) / 1e6
        assert 0.4 < dt.mean() < 0.6 and dt.min() > 0.29 and dt.max() < 0.62   # 4-7 rounds of 50/100 ms
        # every camera has a keyframe for every sample, and sweeps point to the next keyframe's sample
        for ch in schema.VIEWS:
            fr = _channel_frames(nusc, samples[0], ch)
            assert [sd["sample_token"] for sd in fr if sd["is_key_frame"]] == [s["token"] for s in samples]
            for sd in fr:
                if not sd["is_key_frame"]:
                    assert nusc.get("sample", sd["sample_token"])["timestamp"] > sd["timestamp"]
    assert len(set(all_gaps)) > 1  # not a fixed stride


def test_cameras_fire_on_lidar_rounds(nusc):
    """Each round: CAM_FRONT 35.5 ms before a lidar sweep, rounds 50 or 100 ms apart (12 per 20 sweeps), every
    camera at its rig offset in the same round."""
    sample = nusc.sample[0]
    front = np.array([sd["timestamp"] for sd in _channel_frames(nusc, sample, "CAM_FRONT")])
    lidar = np.array([sd["timestamp"] for sd in _channel_frames(nusc, sample, "LIDAR_TOP")])
    steps = np.diff(front)
    assert set(np.round(steps, -4)) == {50_000, 100_000} and abs(steps.mean() - 1e6 / 12) < 2_000
    assert (np.abs(steps - np.round(steps, -4)) <= 1_000).all()           # jitter +-0.3 ms per image
    dl = np.abs(lidar[None] - (front[:, None] + 35_500)).min(1)
    assert dl.max() <= 1_000 and abs(np.diff(lidar).mean() - 50_000) < 500
    for ch in schema.VIEWS:
        ts = np.array([sd["timestamp"] for sd in _channel_frames(nusc, sample, ch)])
        assert len(ts) == len(front)                                       # the test fixture drops nothing
        assert (np.abs(ts - front - CAMERA_RIG[ch][5]) <= 1_000).all(), ch


def test_annotation_chains(nusc):
    by_inst = defaultdict(list)
    for ann in nusc.sample_annotation:
        by_inst[ann["instance_token"]].append(ann)
    assert set(by_inst) == {i["token"] for i in nusc.instance}
    for inst in nusc.instance:
        chain, tok = [], inst["first_annotation_token"]
        while tok:
            chain.append(nusc.get("sample_annotation", tok))
            tok = chain[-1]["next"]
        assert len(chain) == inst["nbr_annotations"] == len(by_inst[inst["token"]])
        assert chain[-1]["token"] == inst["last_annotation_token"]
        ts = [nusc.get("sample", a["sample_token"])["timestamp"] for a in chain]
        assert ts == sorted(ts)
        for a, b in zip(chain[:-1], chain[1:]):
            assert b["prev"] == a["token"]
            # contiguous: consecutive annotations sit on consecutive samples
            assert nusc.get("sample", a["sample_token"])["next"] == b["sample_token"]
        for a in chain:
            assert a["visibility_token"] in {"1", "2", "3", "4"}
            assert a["num_lidar_pts"] >= 0 and a["num_radar_pts"] >= 0


def test_all_classes_appear_and_disappear(nusc):
    first, last = {}, {}
    for scene in nusc.scene:
        s = _scene_samples(nusc, scene)
        first[scene["token"]], last[scene["token"]] = s[0]["token"], s[-1]["token"]
    blinking, seen = set(), set()
    unmapped = set()
    for inst in nusc.instance:
        cat = nusc.get("category", inst["category_token"])["name"]
        cls = schema.NUSCENES_CATEGORY_TO_CLASS.get(cat)
        if cls is None:
            unmapped.add(cat)
            continue
        seen.add(cls)
        a = nusc.get("sample_annotation", inst["first_annotation_token"])
        b = nusc.get("sample_annotation", inst["last_annotation_token"])
        scene = nusc.get("sample", a["sample_token"])["scene_token"]
        if a["sample_token"] != first[scene] and b["sample_token"] != last[scene]:
            blinking.add(cls)
    assert seen == set(schema.OBJECT_CLASSES)
    assert blinking == set(schema.OBJECT_CLASSES)
    assert unmapped  # categories the pipeline must drop


def test_truth_file_matches_annotations(synth_dataset, nusc):
    """Annotations are samples of the truth: interpolating the 12 Hz truth of CAM_FRONT to the
    keyframe (lidar) timestamp reproduces every annotation to a centimetre."""
    t = pq.read_table(synth_dataset.truth_path).to_pandas()
    front = t[(t.channel == "CAM_FRONT") & ~t.dropped]
    assert set(front.sample_data_token) <= {sd["token"] for sd in nusc.sample_data}
    assert set(t.instance_token) == {i["token"] for i in nusc.instance}
    assert (~t.present).any() and t.present.any()
    groups = {k: g.sort_values("timestamp_us") for k, g in front.groupby("instance_token")}
    checked = 0
    for ann in nusc.sample_annotation[::7]:
        ts = nusc.get("sample", ann["sample_token"])["timestamp"]
        g = groups[ann["instance_token"]]
        if ts > g.timestamp_us.max():  # the last keyframe's lidar fires after the last CAM_FRONT frame
            continue
        x = np.interp(ts, g.timestamp_us, g.x)
        y = np.interp(ts, g.timestamp_us, g.y)
        assert np.hypot(x - ann["translation"][0], y - ann["translation"][1]) < 0.01
        row = g.iloc[0]
        assert np.allclose([row.w, row.l, row.h], ann["size"], atol=1e-5)
        checked += 1
    assert checked > 50


def test_map_layers_and_drivable_under_ego(synth_dataset, nusc, nmap):
    for layer in schema.MAP_CLASSES:
        assert len(getattr(nmap, layer)) > 0, layer
    # every scene's car park has a planted island: a hole in a drivable-area polygon, not drivable
    holed = [nmap.get("polygon", p) for rec in nmap.drivable_area for p in rec["polygon_tokens"]
             if nmap.get("polygon", p)["holes"]]
    assert len(holed) == len(nusc.scene)
    for poly in holed:
        hole = np.array([[nmap.get("node", n)["x"], nmap.get("node", n)["y"]] for n in poly["holes"][0]["node_tokens"]])
        x, y = hole.mean(0)
        assert not nmap.layers_on_point(x, y)["drivable_area"] and nmap.layers_on_point(x, y)["carpark_area"] == ""
    for sample in nusc.sample[::5]:
        sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
        ep = nusc.get("ego_pose", sd["ego_pose_token"])
        x, y = ep["translation"][:2]
        yaw = np.degrees(2 * np.arctan2(ep["rotation"][3], ep["rotation"][0]))
        masks = nmap.get_map_mask((x, y, 100, 100), yaw, list(schema.MAP_CLASSES), (200, 200))
        assert masks.shape == (8, 200, 200)
        assert masks[0, 98:102, 98:102].all()          # drivable area under the ego
        assert masks[0].mean() < 0.5                   # ... but not everywhere
        assert masks[schema.MAP_CLASSES.index("walkway")].any()
        assert masks[schema.MAP_CLASSES.index("lane_divider")].any()
        assert nmap.layers_on_point(x, y)["drivable_area"]
