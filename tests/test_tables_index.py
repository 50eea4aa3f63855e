"""The per-scene table index (pipeline/scenes/tableindex.py) against the devkit, the reference: same records,
same decorations, the same scene stores; and what a scene task holds does not grow with the table set."""
from __future__ import annotations

import gc
import json

import numpy as np
import pytest

from pipeline.scenes.bevmap import map_geometry
from pipeline.scenes.mapcrop import MapCropper, load_geometry
from pipeline.scenes.nuscenes import load_map, load_nuscenes
from pipeline.scenes.scenestore import build_scene_store_status, open_scene_store
from pipeline.scenes.tableindex import PER_SCENE, WHOLE, SceneTables, build_table_index, ensure_table_index, \
    iter_json_array, read_meta


@pytest.fixture(scope="module")
def index(synth_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("index_out")
    return build_table_index(str(synth_dataset.root), synth_dataset.version, str(out)), out


@pytest.mark.parametrize("chunk", [7, 64, 1 << 22])
def test_streaming_parser_equals_json_load(synth_dataset, chunk):
    path = synth_dataset.root / synth_dataset.version / "sample_annotation.json"
    assert list(iter_json_array(str(path), chunk=chunk)) == json.loads(path.read_text())


def test_streaming_parser_reads_pretty_printed_and_rejects_truncated(tmp_path):
    recs = [{"token": "a", "xs": [1.5, {"k": "]}"}]}, {"token": "b", "xs": []}]
    p = tmp_path / "t.json"
    p.write_text(json.dumps(recs, indent=4))
    assert list(iter_json_array(str(p), chunk=5)) == recs
    p.write_text(json.dumps(recs, indent=4)[:-12])
    with pytest.raises(ValueError, match=r"ends inside record 2 \(which starts at line 11\).*truncated"):
        list(iter_json_array(str(p), chunk=5))
    p.write_text('{"token": "a"}')
    with pytest.raises(ValueError, match="not a JSON array"):
        list(iter_json_array(str(p)))


def test_scene_records_equal_the_devkit(synth_dataset, index):
    uri, _ = index
    nusc = load_nuscenes(str(synth_dataset.root), synth_dataset.version)
    seen = {t: 0 for t in PER_SCENE}
    for name in synth_dataset.scene_names:
        st = SceneTables(uri, name, str(synth_dataset.root))
        assert st.version == nusc.version and st.dataroot == nusc.dataroot and st.scene == nusc.scene
        for table in PER_SCENE:
            for rec in getattr(st, table):
                assert rec == nusc.get(table, rec["token"]), (table, rec["token"])  # incl. channel, data, anns
            seen[table] += len(getattr(st, table))
        for table in WHOLE:
            strip = (lambda r: {k: v for k, v in r.items() if k != "mask"}) if table == "map" else (lambda r: r)
            assert getattr(st, table) == [strip(r) for r in getattr(nusc, table)], table
        with pytest.raises(KeyError, match="not in scene"):
            st.get("sample_data", "0" * 32)
    assert seen == {t: len(getattr(nusc, t)) for t in PER_SCENE}   # every record in exactly one scene


def test_scene_store_identical_both_ways(synth_dataset, index, tmp_path):
    """The scene code runs unchanged on either source (devkit + NuScenesMap, or table index + map crop) and
    writes the same arrays, attrs and inputs hash."""
    uri, _ = index
    root, version = str(synth_dataset.root), synth_dataset.version
    nusc = load_nuscenes(root, version)
    cropper = MapCropper(uri, root, synth_dataset.scene_names)
    for name in synth_dataset.scene_names:
        a, _ = build_scene_store_status(root, version, name, str(tmp_path / "devkit"), nusc=nusc)
        b, _ = build_scene_store_status(root, version, name, str(tmp_path / "index"), nusc=SceneTables(uri, name),
                                        nusc_map=cropper.crop(name))
        sa, sb = open_scene_store(a), open_scene_store(b)
        for field in ("timestamps_us", "keyframe", "frame_paths", "frame_ok", "lidar2global", "intrinsics",
                      "cam2lidar", "box_class", "box_track", "instance_tokens", "boxes", "box_mask", "visibility",
                      "num_lidar_pts", "fill_from", "gap", "source_sizes"):
            np.testing.assert_array_equal(getattr(sa, field), getattr(sb, field), err_msg=f"{name}.{field}")
        for cells in sa.bev:
            np.testing.assert_array_equal(sa.bev[cells], sb.bev[cells], err_msg=f"{name}.bev {cells}")
        assert sa.problems == sb.problems and sa.split == sb.split and sa.map_name == sb.map_name
        import zarr
        assert zarr.open_group(a, mode="r").attrs["inputs_hash"] == zarr.open_group(b, mode="r").attrs["inputs_hash"]


def test_streamed_map_geometry_equals_the_devkit_maps(synth_dataset, index):
    """load_geometry (no NuScenesMap) = bevmap.map_geometry(NuScenesMap), element for element; a crop keeps the
    elements near its scene only."""
    uri, _ = index
    path = synth_dataset.root / "maps" / "expansion" / f"{synth_dataset.map_name}.json"
    ref, got = map_geometry(load_map(str(synth_dataset.root), synth_dataset.map_name)), load_geometry(str(path))
    for layer, items in ref.polygons.items():
        assert len(got.polygons[layer]) == len(items) > 0, layer
        for (e0, h0), (e1, h1) in zip(items, got.polygons[layer]):
            np.testing.assert_array_equal(e0, e1)
            assert len(h0) == len(h1) and all(np.array_equal(a, b) for a, b in zip(h0, h1))
    for layer, items in ref.lines.items():
        assert len(got.lines[layer]) == len(items) > 0
        assert all(np.array_equal(a, b) for a, b in zip(items, got.lines[layer]))
    for k in ref.poly_bbox:
        np.testing.assert_array_equal(ref.poly_bbox[k], got.poly_bbox[k])
    crops = [MapCropper(uri, str(synth_dataset.root), synth_dataset.scene_names).crop(n)
             for n in synth_dataset.scene_names]
    sizes = [sum(len(v) for v in c.bev_geometry.polygons.values()) for c in crops]
    assert all(0 < n < sum(len(v) for v in ref.polygons.values()) for n in sizes), sizes   # scenes sit apart


def test_index_is_reused_and_rebuilt_when_tables_change(synth_dataset, index, tmp_path):
    uri, out = index
    before = read_meta(uri)
    assert ensure_table_index(str(synth_dataset.root), synth_dataset.version, str(out)) == uri
    assert read_meta(uri) == before
    assert before["counts"]["sample_data"] == sum(1 for _ in iter_json_array(
        str(synth_dataset.root / synth_dataset.version / "sample_data.json")))
    with pytest.raises(FileNotFoundError, match="no nuScenes tables"):
        ensure_table_index(str(tmp_path), "v1.0-nothere", str(tmp_path / "o"))


@pytest.mark.slow
def test_scene_tasks_hold_one_scene_not_the_table_set(ray_local, tmp_path):
    """Scene synth-0000 is the same in a 1-scene and a 3-scene table set: the Ray scene tasks of the real build
    hold the same records for it (not more with more scenes) and no devkit object (NuScenes, NuScenesMap) is
    ever created in a worker."""
    from pipeline.build import _run_scenes
    from pipeline.shards.build_config import BuildConfig
    from pipeline.synth.scale import write_tables_only
    def held_by_scene_task(uri: str, scene: str) -> dict:
        """What a scene task holds: its SceneTables' record counts; and any full devkit object in the process."""
        from nuscenes.map_expansion.map_api import NuScenesMap
        from nuscenes.nuscenes import NuScenes
        from pipeline import build
        st = SceneTables(uri, scene)
        return {"records": {t: len(getattr(st, t)) for t in PER_SCENE},
                "devkit_objects": sum(isinstance(o, (NuScenes, NuScenesMap)) for o in gc.get_objects()),
                "cached_devkit": len(build._NUSC)}

    held = []   # the probe is a closure so that Ray ships it by value (tests/ is not importable in workers)
    for n in (1, 3):
        data = write_tables_only(tmp_path / f"d{n}", scenes=n, seconds=3.0, image_size=(160, 90))
        cfg = BuildConfig(stage="demo", dataroot=str(data.root), version=data.version, out=str(tmp_path / f"o{n}"),
                          vae="unused", progress=False)
        quarantine, secs = [], {}
        stores = _run_scenes(ray_local, cfg, data.scene_names, quarantine, secs)
        assert sorted(stores) == data.scene_names and not quarantine, quarantine
        uri = ensure_table_index(cfg.dataroot, cfg.version, cfg.out)
        probe = ray_local.remote(num_cpus=1)(held_by_scene_task)
        # every worker of the session ran scene tasks above: none may hold a devkit object
        held.append(ray_local.get([probe.remote(uri, "synth-0000") for _ in range(4)]))
    for runs in held:
        for h in runs:
            assert h["devkit_objects"] == 0 and h["cached_devkit"] == 0, h
    assert held[0][0]["records"] == held[1][0]["records"]
    assert read_meta(uri)["counts"]["sample_data"] > 2.5 * held[1][0]["records"]["sample_data"]
