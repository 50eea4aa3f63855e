"""mdv2-inspect --rerun / mdv2-sample --rerun (pipeline/tools/rerunlog.py), read back with Rerun's own reader.

A sample with known geometry: CAM_FRONT looks straight ahead from 1 m in front of the LiDAR, one box sits
10 m in front of it at every frame, the ego drives forward and turns. From the recording alone (its
dataframe API): the entity paths, each view's images at its own exposure, the box projected through the
logged pinhole and camera pose onto the principal point, and the world positions agreeing between the
camera chain and the ego chain."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from factories import make_sample
from pipeline.contract import geometry, schema
from pipeline.contract.shardio import write_shard
from pipeline.tools.inspect import main as inspect_main

import pyarrow as pa
import rerun.dataframe as rdf  # the viewer extra, also in the test extra (pyproject.toml)

K = np.array([[100.0, 0, 64], [0, 100.0, 32], [0, 0, 1]], np.float32)
CAM_IN_LIDAR = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], np.float64)   # columns: camera x, y, z in LiDAR


def rz(a: float) -> np.ndarray:
    r = np.eye(4)
    r[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    return r


def known_sample(start: int = 0, num_frames: int = 5, scene: str = "synth-0001", step: float = 0.5,
                 turn: float = 0.05) -> dict:
    s = make_sample(scene_name=scene, start=start, num_frames=num_frames, num_boxes=2, seed=start)
    t, v = num_frames, len(schema.VIEWS)
    c2l = np.zeros((t, v, 4, 4))
    for vi in range(v):   # view v looks along LiDAR +y rotated by 60 degrees per view (CAM_FRONT = index 1)
        pose = rz(np.deg2rad(60 * (1 - vi))) @ np.block([[CAM_IN_LIDAR, np.array([[0], [1.0], [0]])],
                                                         [np.zeros((1, 3)), np.ones((1, 1))]])
        c2l[:, vi] = pose
    s["cam2lidar"] = c2l.astype(np.float32)
    s["intrinsics"] = np.tile(K, (v, 1, 1))
    boxes = np.zeros((t, 2, 7), np.float32)
    boxes[:, 0] = [0, 11, 0, 2, 4, 1.5, 0]    # 10 m ahead of CAM_FRONT, axis-aligned
    boxes[:, 1] = [5, -8, 0, 1, 1, 1, 0.3]
    s["boxes"], s["box_mask"] = boxes, np.ones((t, 2), bool)
    s["view_boxes"] = np.repeat(boxes[:, None], v, 1)
    s["box_view_mask"] = np.ones((t, v, 2), bool)
    s["box_class"], s["box_track"] = np.array([0, 8], np.int8), np.array([0, 1], np.int32)
    s["traj"] = np.stack([rz(turn * i) @ _ty(step * i) for i in range(start, start + t)]).astype(np.float32)
    s["traj"] = np.stack([np.linalg.inv(s["traj"][0].astype(np.float64)) @ m for m in s["traj"]]).astype(np.float32)
    return s


def _ty(y: float) -> np.ndarray:
    m = np.eye(4)
    m[1, 3] = y
    return m


def shard_of(tmp_path, samples: list[dict], name: str = "shard-000000.tar"):
    path = tmp_path / "train" / "64x128_t5" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    write_shard(path, [(s["key"], schema.encode_sample(s)) for s in samples])
    return path


def rows(rrd, entity: str, component: str, index: str = "frame") -> list[tuple]:
    """(index value, component value) of every row of the recording where the entity logged the component;
    the index as an int (the frame, or microseconds on the time timeline)."""
    table = rdf.load_recording(str(rrd)).view(index=index, contents=entity).select().read_all()
    idx = table.column(index)
    idx = idx.cast(pa.int64()).to_pylist() if pa.types.is_timestamp(idx.type) else idx.to_pylist()
    if index == "time":
        idx = [i // 1000 for i in idx]  # ns -> us
    col = f"{entity}:{component}"
    return [(i, v) for i, v in zip(idx, table.column(col).to_pylist()) if v is not None]


def col_major(flat: list[float], n: int) -> np.ndarray:
    return np.asarray(flat, np.float64).reshape(n, n).T   # Rerun stores matrices column-major


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rerun")
    s = known_sample()
    shard = shard_of(tmp, [s])
    rrd = tmp / "sample.rrd"
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # rerun 0.23 on numpy 1.26 warns (and drops the data) on bad inputs
        assert inspect_main([str(shard), "--rerun", str(rrd)]) == 0
    return rrd, s


def test_entity_paths(recording):
    rrd, _ = recording
    paths = {c.entity_path for c in rdf.load_recording(str(rrd)).schema().component_columns()}
    expected = {"/world", "/world/ego", "/world/ego/boxes", "/world/ego/bev", "/world/ego/car", "/world/trajectory",
                "/bev", "/caption"}
    for v in schema.VIEWS:
        expected |= {f"/world/cams/{v}", f"/world/cams/{v}/image", f"/world/cams/{v}/boxes",
                     f"/world/cams/{v}/image/boxes"}
    assert expected <= paths, sorted(expected - paths)


def test_views_are_logged_at_their_own_exposures(recording):
    rrd, s = recording
    vts = np.asarray(s["meta"]["view_timestamps_us"])
    for v, name in enumerate(schema.VIEWS):
        got = rows(rrd, f"/world/cams/{name}/image", "ImageBuffer", index="time")
        assert [us for us, _ in got] == vts[:, v].tolist(), name
    frames = [f for f, _ in rows(rrd, "/world/ego", "Translation3D")]
    assert frames == list(range(s["meta"]["start_frame"], s["meta"]["start_frame"] + 5))   # the 12 Hz timeline
    assert [us for us, _ in rows(rrd, "/world/ego", "Translation3D", "time")] == s["meta"]["timestamps_us"]


def test_a_box_projects_through_the_logged_camera(recording):
    """The box 10 m ahead of CAM_FRONT, read from the recording in camera coordinates, projects through the
    logged pinhole onto the principal point; its world position by the camera chain equals the ego chain's."""
    rrd, s = recording
    pinhole = col_major(rows(rrd, "/world/cams/CAM_FRONT/image", "PinholeProjection")[0][1][0], 3)
    assert np.allclose(pinhole, K)
    boxes = dict(rows(rrd, "/world/cams/CAM_FRONT/boxes", "PoseTranslation3D"))
    cams = {f: (np.asarray(tr[0]), col_major(m[0], 3)) for (f, tr), (_, m) in
            zip(rows(rrd, "/world/cams/CAM_FRONT", "Translation3D"), rows(rrd, "/world/cams/CAM_FRONT", "TransformMat3x3"))}
    egos = {f: (np.asarray(tr[0]), col_major(m[0], 3)) for (f, tr), (_, m) in
            zip(rows(rrd, "/world/ego", "Translation3D"), rows(rrd, "/world/ego", "TransformMat3x3"))}
    ref = dict(rows(rrd, "/world/ego/boxes", "PoseTranslation3D"))
    for t in range(5):
        centre_cam = np.asarray(boxes[t][0])
        assert np.allclose(centre_cam, [0, 0, 10], atol=1e-5)
        uvw = pinhole @ centre_cam
        assert np.allclose(uvw[:2] / uvw[2], [64, 32], atol=1e-4)
        (ct, cr), (et, er) = cams[t], egos[t]
        world_by_cam = cr @ centre_cam + ct
        world_by_ego = er @ np.asarray(ref[t][0]) + et
        assert np.allclose(world_by_cam, world_by_ego, atol=1e-4)
        expected = s["traj"][t].astype(np.float64) @ np.array([0, 11, 0, 1.0])   # LiDAR(t) -> LiDAR(0) = world
        assert np.allclose(world_by_ego, expected[:3], atol=1e-4)


def test_the_projected_outline_is_centred_on_the_principal_point(recording):
    rrd, _ = recording
    strips = rows(rrd, "/world/cams/CAM_FRONT/image/boxes", "LineStrip2D")[0][1]
    ids = rows(rrd, "/world/cams/CAM_FRONT/image/boxes", "ClassId")[0][1]
    car = np.asarray([p for strip, c in zip(strips, ids) if c == 0 for p in strip])   # 12 edges x 2 ends
    assert car.shape == (24, 2) and np.allclose(car.mean(0), [64, 32], atol=1e-3)  # symmetric about the axis
    # 4 m long (along LiDAR x = the image's u), 1.5 m high, its near face 9 m away: 100 px per m at 1 m depth
    assert np.isclose(np.ptp(car[:, 0]), 400 / 9, atol=1e-3) and np.isclose(np.ptp(car[:, 1]), 150 / 9, atol=1e-3)


def test_a_scene_chains_clips_that_share_a_frame(tmp_path):
    """Clips 0-4 and 4-8 of one drive: the second continues from the first's frame 4 exactly, so the ego's
    world position at scene frame 6 is the drive's own."""
    a, b = known_sample(0, 5, step=0.5, turn=0.0), known_sample(4, 5, step=0.5, turn=0.0)
    shard = shard_of(tmp_path, [a, b])
    rrd = tmp_path / "scene.rrd"
    assert inspect_main([str(shard), "--rerun", str(rrd), "--scene", "synth-0001"]) == 0
    ego = dict(rows(rrd, "/world/ego", "Translation3D"))
    assert sorted(ego) == list(range(9))
    for f in range(9):
        assert np.allclose(ego[f][0], [0, 0.5 * f, 0], atol=1e-5), f


def test_scene_needs_rerun_and_unknown_scene_is_an_error(tmp_path, capsys):
    shard = shard_of(tmp_path, [known_sample()])
    assert inspect_main([str(shard), "--scene", "synth-0001"]) == 2
    assert inspect_main([str(shard), "--rerun", str(tmp_path / "x.rrd"), "--scene", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("error:") for e in err) and "nope" in err[1]


def test_generated_frames_are_logged_with_their_conditions(tmp_path):
    """mdv2-sample --rerun's call: generated views (here: known colours) under each camera, with the boxes
    they were conditioned on."""
    from pipeline.contract.shardio import iter_shard
    from pipeline.tools.rerunlog import write_generated
    from train.data import decode
    s = known_sample()
    shard = shard_of(tmp_path, [s])
    key, members = next(iter_shard(shard))
    cond = decode(dict(members, __key__=key))
    import json
    meta = json.loads(members["meta.json"])
    frames = np.zeros((6, 5, 64, 128, 3), np.uint8)
    frames[..., 0] = np.arange(6)[:, None, None, None] * 40   # view v is red level 40 v
    rrd = tmp_path / "gen.rrd"
    write_generated(str(rrd), cond, meta, frames)
    img = rows(rrd, "/world/cams/CAM_BACK/image", "ImageBuffer")
    assert len(img) == 5 and set(np.asarray(img[0][1][0]).reshape(64, 128, 3)[..., 0].ravel()) == {160}
    assert np.allclose(rows(rrd, "/world/cams/CAM_FRONT/boxes", "PoseTranslation3D")[0][1][0], [0, 0, 10], atol=1e-5)


def test_sample_command_offers_rerun(capsys):
    from train.sample import main as sample_main
    with pytest.raises(SystemExit):
        sample_main(["--help"])
    assert "--rerun OUT.rrd" in capsys.readouterr().out


def test_geometry_helper_matches_the_contract():
    """The quaternion the viewer logs is the box's yaw (geometry's convention, reordered x y z w)."""
    from pipeline.tools.rerunlog import _quat_xyzw, _rz
    q = _quat_xyzw(_rz(np.array([0.7])))[0]
    w = geometry.yaw_to_quat(np.array(0.7))
    assert np.allclose(q, [w[1], w[2], w[3], w[0]], atol=1e-6)
