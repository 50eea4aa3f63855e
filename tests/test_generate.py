"""train/generate.py (mdv2-generate): an eval set of G seeded generations per clip in the layout and
manifest of INTERFACES.md E, resumable, and the same files from 2 torchrun processes (slow)."""
from __future__ import annotations

import json
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.contract import schema
from pipeline.contract.shardio import iter_shard
from tests.test_train_sample import VIEWS, run, torchrun  # noqa: F401  (run: module fixture)
from train.generate import MANIFEST_SCHEMA, main
from train.video import read_pngs

COLUMNS = ["key", "generation", "seed", "split", "bucket", "num_frames", "height", "width", "views", "source_frames",
           "timestamps_us", "view_timestamps_us", "source_size", "fill_mask", "dir", "config"]


def args(run, out, *extra: str) -> list[str]:
    return ["--ckpt", str(run / "run"), "--vae", str(run / "vae"), "--data-root", str(run / "shards"),
            "--split", "val", "--text-cache", str(run / "text_cache"), "--out", str(out), "--steps", "2",
            "--no-progress", *extra]


def metas(run) -> dict[str, dict]:
    """meta.json of every val sample, by key, read straight from the tars."""
    out = {}
    for p in sorted((run / "shards" / "val").glob("*/*.tar")):
        for key, members in iter_shard(p):
            out[key] = json.loads(members["meta.json"])
    return out


def files(folder) -> dict[str, int]:
    """relative path -> mtime_ns of every file under folder except the manifest."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")
            if p.is_file() and p.name != "manifest.parquet"}


def summary(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_generate_writes_every_generation_and_a_rerun_makes_none(run, capsys):
    out = run / "evalset"
    assert main(args(run, out, "--bucket", "32x64_t9", "--generations", "2", "--limit", "2", "--frames", "9",
                     "--cut", "8")) == 0
    assert summary(capsys)["generated"] == 4
    keys = sorted(k for k in metas(run) if k.endswith("_009_32x64"))[:2]
    table = pq.read_table(out / "manifest.parquet")
    assert table.schema.names == COLUMNS and table.schema.equals(MANIFEST_SCHEMA)
    rows = table.to_pylist()
    assert [(r["key"], r["generation"]) for r in rows] == [(k, g) for k in keys for g in (0, 1)]
    meta = metas(run)
    for r in rows:
        m = meta[r["key"]]
        assert r["seed"] == 1024 + r["generation"] and r["split"] == "val" and r["bucket"] == "32x64_t9"
        assert (r["num_frames"], r["height"], r["width"], r["views"]) == (9, 32, 64, list(VIEWS))
        assert r["source_frames"] == m["frames"] and r["timestamps_us"] == m["timestamps_us"]
        assert r["view_timestamps_us"] == m["view_timestamps_us"]
        assert r["fill_mask"] == [[False] * 3] * 9                     # nothing repaired in these shards
        assert r["source_size"] == m.get("source_size")               # schema 3.0 shards carry it
        assert r["dir"] == f"{r['key']}/g{r['generation']:02d}"
        config = json.loads(r["config"])
        assert (config["steps"], config["frames"], config["cut"], config["base_seed"]) == (2, 9, 8, 1024)
        folder = out / r["dir"]
        assert json.loads((folder / "sample.json").read_text())["config"] == config
        for v in VIEWS:
            assert read_pngs(folder / "frames" / v).shape == (9, 32, 64, 3)
            assert (folder / f"{v}.mp4").is_file()
    g0, g1 = (read_pngs(out / rows[0]["dir"].replace("g00", g) / "frames" / VIEWS[0]) for g in ("g00", "g01"))
    assert np.abs(g0.astype(int) - g1.astype(int)).mean() > 5       # two seeds, two videos

    before = files(out)
    assert main(args(run, out, "--bucket", "32x64_t9", "--generations", "2", "--limit", "2", "--frames", "9",
                     "--cut", "8")) == 0
    assert summary(capsys)["generated"] == 0 and files(out) == before   # nothing regenerated, nothing touched

    # a partial generation (its sample.json and a frame gone; a stale temp folder) is redone, the same
    victim = out / rows[1]["dir"]
    want = read_pngs(victim / "frames" / VIEWS[1])
    (victim / "sample.json").unlink()
    (victim / "frames" / VIEWS[1] / "004.png").unlink()
    (out / rows[2]["key"] / ".g02.tmp" / "frames").mkdir(parents=True)   # left by a killed run
    assert main(args(run, out, "--bucket", "32x64_t9", "--generations", "3", "--limit", "2", "--frames", "9",
                     "--cut", "8")) == 0
    assert summary(capsys)["generated"] == 1 + 2                       # the partial one + generation 2 of each
    np.testing.assert_array_equal(read_pngs(victim / "frames" / VIEWS[1]), want)
    assert not (out / rows[2]["key"] / ".g02.tmp").exists() and (out / rows[2]["key"] / "g02").is_dir()
    assert pq.read_table(out / "manifest.parquet").num_rows == 6


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_a_wrong_clip_list_is_one_error_line(run, capsys, tmp_path):
    clips = tmp_path / "clips.txt"
    key = sorted(metas(run))[0]
    clips.write_text(f"# eval clips\n{key}\nsynth-9999_0000_009_32x64\n")
    assert main(args(run, tmp_path / "o", "--clips", str(clips))) == 2
    line = _error(capsys)
    assert "'synth-9999_0000_009_32x64'" in line and "not in split 'val'" in line and key not in line
    assert main(args(run, tmp_path / "o", "--bucket", "64x128_t9")) == 2
    assert "'64x128_t9'" in _error(capsys)
    assert main(args(run, tmp_path / "o", "--clips", str(tmp_path / "nope.txt"))) == 2
    assert "nope.txt" in _error(capsys)
    assert main(args(run, tmp_path / "o", "--bucket", "32x64_t1", "--frames", "9")) == 2
    assert "has 1 frames" in _error(capsys)
    assert main(args(run, tmp_path / "o", "--frames", "8")) == 2
    assert "4k+1" in _error(capsys)
    assert not (tmp_path / "o").exists()                               # nothing generated, nothing written


def test_an_out_folder_holds_one_generation_config(run, capsys, tmp_path):
    out = tmp_path / "set"
    assert main(args(run, out, "--bucket", "32x64_t1", "--limit", "1", "--generations", "1")) == 0
    capsys.readouterr()
    assert main(args(run, out, "--bucket", "32x64_t1", "--limit", "1", "--generations", "1", "--cfg-scale", "3")) == 2
    line = _error(capsys)
    assert "cfg_scale=2.0" in line and "cfg_scale=3.0" in line and "another --out" in line


@pytest.mark.slow
def test_two_processes_split_the_clips_and_write_the_same_files(run, capsys, tmp_path):
    """torchrun --nproc_per_node 2: clip i goes to rank i mod 2, each writes its own; the files equal one
    process's (same seeds, same videos: the PNG frames compared numerically, the manifest row by row).
    Then --sp 2 (one group of 2 ranks sharing each clip's tokens and views): the same within float noise."""
    common = ("--bucket", "32x64_t9", "--generations", "1", "--frames", "5")
    one, two, sp = tmp_path / "one", tmp_path / "two", tmp_path / "sp"
    assert main(args(run, one, *common)) == 0
    r = torchrun(2, "train.generate", *args(run, two, *common))
    assert "on dp group 0: 2 to make of 2 (dp 2 x sp 1)" in r.stderr    # 3 clips: ranks take 2 and 1
    torchrun(2, "train.generate", *args(run, sp, *common, "--sp", "2"))
    rows = {d: pq.read_table(d / "manifest.parquet").to_pylist() for d in (one, two, sp)}
    assert len(rows[one]) == 3
    for d in (two, sp):
        assert rows[d] == rows[one]
        for row in rows[one]:
            for v in VIEWS:
                a, b = read_pngs(one / row["dir"] / "frames" / v), read_pngs(d / row["dir"] / "frames" / v)
                diff = np.abs(a.astype(int) - b.astype(int))
                assert a.shape == (5, 32, 64, 3) and diff.max() <= (0 if d == two else 2) and diff.mean() < 0.05
    assert schema.valid_num_frames(rows[one][0]["num_frames"])


def test_fill_mask_comes_from_the_member_or_the_meta():
    """Schema 3.0 records repaired drops as fill_mask.npy (T, V) and meta "filled" pairs; the manifest
    keeps the generated frames' rows of it."""
    from train.generate import fill_mask
    meta = {"filled": [[1, 2], [4, 0]]}
    assert fill_mask({}, meta, 3, 3) == [[False] * 3, [False, False, True], [False] * 3]
    mask = np.zeros((5, 3), bool)
    mask[0, 1] = mask[4, 2] = True
    assert fill_mask({"fill_mask.npy": schema.npy_bytes(mask)}, meta, 5, 3) == mask.tolist()
    assert fill_mask({}, {}, 2, 3) == [[False] * 3] * 2
