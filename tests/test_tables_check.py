"""Tables checked before use (pipeline/scenes/tablecheck.py, jsonstream.py, tableindex.py): each defect of a
nuScenes table is refused with one `error:` line naming the file, the record and the field, before any scene
is processed; scene.json and manifest.parquet errors name their file."""
from __future__ import annotations

import json
import shutil

import pytest

from pipeline.scenes import run
from pipeline.scenes.tableindex import SceneTables, build_table_index

VERSION = "v1.0-synth"


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    from pipeline.synth.scale import write_tables_only
    root = tmp_path_factory.mktemp("tables")
    write_tables_only(root, scenes=2, seconds=2.0, image_size=(400, 225), seed=0, version=VERSION)
    return root


@pytest.fixture
def data(tables, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tables, root)
    return root


def _records(root, table: str) -> list[dict]:
    return json.loads((root / VERSION / f"{table}.json").read_text())


def _write(root, table: str, recs: list[dict]) -> None:
    (root / VERSION / f"{table}.json").write_text("[\n" + ",\n".join(json.dumps(r) for r in recs) + "\n]\n")


def _error_line(root, tmp_path, capsys) -> str:
    rc = run.main(["--dataroot", str(root), "--version", VERSION, "--out", str(tmp_path / "out"), "--stage", "none",
                   "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), (rc, err)
    return err[0]


def test_clean_tables_index_as_before(tables, tmp_path):
    uri = build_table_index(str(tables), VERSION, str(tmp_path / "out"))
    scene = _records(tables, "scene")[0]["name"]
    st = SceneTables(uri, scene, str(tables))
    assert len(st.ego_pose) > 0 and all(st.get("ego_pose", r["token"]) is r for r in st.ego_pose)


def test_a_token_twice_with_different_content_is_refused(data, tmp_path, capsys):
    """The issue's case: two ego_pose records with one token, the second 50 m away (the later one used to win)."""
    recs = _records(data, "ego_pose")
    twin = dict(recs[5], translation=[recs[5]["translation"][0] + 50.0, *recs[5]["translation"][1:]])
    _write(data, "ego_pose", recs + [twin])
    line = _error_line(data, tmp_path, capsys)
    assert f"ego_pose.json: token {recs[5]['token']} appears twice with different content" in line
    assert f"record 6 (line 7) and record {len(recs) + 1} (line {len(recs) + 2})" in line
    assert "field 'translation'" in line


def test_an_identical_repeat_is_dropped_not_refused(data, tmp_path):
    recs = _records(data, "ego_pose")
    _write(data, "ego_pose", recs + [recs[3]])
    uri = build_table_index(str(data), VERSION, str(tmp_path / "out"))
    names = [s["name"] for s in _records(data, "scene")]
    poses = [r["token"] for n in names for r in SceneTables(uri, n, str(data)).ego_pose]
    assert sorted(poses) == sorted({r["token"] for r in recs} & set(poses)) and len(poses) == len(set(poses))


def test_a_scene_token_twice_names_scene_json(data, tmp_path, capsys):
    recs = _records(data, "scene")
    _write(data, "scene", recs + [dict(recs[0], description="another description")])
    line = _error_line(data, tmp_path, capsys)
    assert f"scene.json: token {recs[0]['token']} appears twice with different content" in line
    assert "field 'description'" in line


def test_a_scene_name_twice_names_scene_json(data, tmp_path, capsys):
    recs = _records(data, "scene")
    _write(data, "scene", [recs[0], dict(recs[1], name=recs[0]["name"])])
    line = _error_line(data, tmp_path, capsys)
    assert f"scene.json: scene name {recs[0]['name']!r} appears twice" in line


@pytest.mark.parametrize("table, field, value, want", [
    ("sample_data", "timestamp", "1532402927647951", "a string"),
    ("ego_pose", "rotation", [1.0, 0.0, 0.0], "expected a list of 4 numbers"),
    ("sample_annotation", "size", None, "expected a list of 3 numbers"),
    ("sample_data", "is_key_frame", 1, "expected true or false"),
])
def test_a_field_of_the_wrong_type_names_file_token_and_field(data, tmp_path, capsys, table, field, value, want):
    recs = _records(data, table)
    recs[7][field] = value
    _write(data, table, recs)
    line = _error_line(data, tmp_path, capsys)
    assert f"{table}.json: record 8 (line 9), token {recs[7]['token']}: field {field!r} is {json.dumps(value)}" in line
    if not want.startswith("a "):
        assert want in line


def test_a_missing_field_is_named(data, tmp_path, capsys):
    recs = _records(data, "sample")
    del recs[2]["scene_token"]
    _write(data, "sample", recs)
    line = _error_line(data, tmp_path, capsys)
    assert f"sample.json: record 3 (line 4), token {recs[2]['token']}: field 'scene_token' is missing" in line


def test_a_truncated_table_names_the_record_it_ends_in(data, tmp_path, capsys):
    path = data / VERSION / "sample_annotation.json"
    recs = _records(data, "sample_annotation")
    _write(data, "sample_annotation", recs)
    text = path.read_text()
    cut = text.index(f'"token": "{recs[10]["token"]}"') + 12   # inside the 11th record (line 12)
    path.write_text(text[:cut])
    line = _error_line(data, tmp_path, capsys)
    assert "sample_annotation.json: the file ends inside record 11 (which starts at line 12)" in line
    assert "truncated" in line


def test_a_syntax_error_gives_the_true_line_and_column(data, tmp_path, capsys):
    """Not 'character N of the current chunk': the line and column in the file, and the record."""
    path = data / VERSION / "instance.json"
    recs = _records(data, "instance")
    _write(data, "instance", recs)
    lines = path.read_text().splitlines()
    lines[4] = lines[4].replace('", "', '" "', 1)     # a missing comma inside record 4 (line 5)
    col = lines[4].index('" "') + 3
    path.write_text("\n".join(lines) + "\n")
    line = _error_line(data, tmp_path, capsys)
    assert f"instance.json: malformed JSON at line 5, column {col} (record 4, which starts at line 5)" in line


def test_the_build_names_a_broken_scene_json(data, tmp_path, capsys):
    """The build reads scene.json before Ray starts: a broken one is one line naming it."""
    from pipeline.build import main
    from pipeline.shards.vae import write_tiny_vae
    (data / VERSION / "scene.json").write_text('[{"token": "a", "name": ')
    vae = write_tiny_vae(tmp_path / "vae")
    rc = main(["--config", "demo", "--dataroot", str(data), "--version", VERSION, "--out", str(tmp_path / "o"),
               "--vae", str(vae), "--no-progress", "--captions", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "scene.json: the file ends inside record 1" in err[0], err


def test_a_damaged_manifest_names_the_file(tmp_path, capsys):
    from pipeline.contract import schema
    from pipeline.tools import stats
    m = tmp_path / schema.manifest_path("train")
    m.parent.mkdir(parents=True)
    m.write_bytes(b"PAR1 not really a parquet file")
    assert stats.main([str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {m}: not a readable parquet table"), err
