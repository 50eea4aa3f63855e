"""mdv2-eval fvd|fid end to end on a generation folder made from the synthetic dataset's own images (tiny
networks with the published key layout, loaded from disk): a set against its own real clips scores ~0, the
score grows with the noise added to the generated frames, the real features come back from the cache, and
every input mistake is one error line naming it."""
from __future__ import annotations

import json
import shutil

import pytest

from factories_eval import TEST_VIEWS, eval_set, noisy, read_manifest_rows, write_manifest  # noqa: F401  (fixture)
from train.eval.cli import main


def _run(metric, es, gen, tmp_path, *extra, cache="none"):
    out = tmp_path / f"{gen.name}_{metric}.json"
    w = es.i3d if metric == "fvd" else es.inception
    rc = main([metric, "--generated", str(gen), "--dataroot", es.dataroot, "--weights", str(w), "--views",
               ",".join(TEST_VIEWS), "--cache-dir", str(cache), "--json", str(out), "--no-progress", "--workers", "2",
               *extra])
    assert rc == 0
    return json.loads(out.read_text())


def _two_clips(es, tmp_path):
    lst = tmp_path / "two.txt"
    lst.write_text("\n".join(r["key"] for r in es.rows[:2]) + "\n")
    return ["--clips", str(lst)]


def test_fvd_quick_two_clips_nine_frames(eval_set, tmp_path):
    """The fast tier's end-to-end pass (the slow test below runs the default 16-frame protocol)."""
    few = _two_clips(eval_set, tmp_path) + ["--frames", "9"]
    same = _run("fvd", eval_set, eval_set.gen, tmp_path, *few)
    noisy8 = _run("fvd", eval_set, eval_set.variant("noise8_two", noisy(8.0), clips=eval_set.clips[:2]), tmp_path, *few)
    assert abs(same["value"]) < 1e-6 < 1e-3 < noisy8["value"] and same["clips"] == 2


@pytest.mark.slow  # I3D / InceptionV3 passes over dozens of clip-views: 15-45 s each on 2 cores
def test_fvd_of_a_set_against_itself_is_zero_and_grows_with_noise(eval_set, tmp_path, capsys):
    """The default protocol (16 frames, x0.25, 224 centre crop)."""
    cache = tmp_path / "cache"
    same = _run("fvd", eval_set, eval_set.gen, tmp_path, cache=cache)
    assert abs(same["value"]) < 1e-6 and all(abs(r["value"]) < 1e-6 for r in same["views"].values()), same
    assert same["cache"] == {"dir": str(cache / "fvd"), "hits": 0, "computed": 8}
    assert same["clips"] == 4 and same["real_features"] == 8 and same["generated_features"] == 8
    assert list(same["views"]) == list(TEST_VIEWS)
    assert same["protocol"] == {"frames": 16, "downsample": 0.25, "crop": 224, "keyframes_only": False}
    assert same["weights"]["divisor"] == 16 and not same["weights"]["published"]
    table = capsys.readouterr().out
    assert "FVD" in table and "CAM_FRONT" in table and "overall" in table and "not comparable" in table

    low = _run("fvd", eval_set, eval_set.variant("noise8", noisy(8.0)), tmp_path, cache=cache)
    high = _run("fvd", eval_set, eval_set.variant("noise40", noisy(40.0)), tmp_path, cache=cache)
    assert low["cache"]["hits"] == 8 and low["cache"]["computed"] == 0       # the real side came from the cache
    assert 1e-3 < low["value"] < high["value"]
    for view in TEST_VIEWS:
        assert 1e-4 < low["views"][view]["value"] < high["views"][view]["value"]


@pytest.mark.slow  # I3D / InceptionV3 passes over dozens of clip-views: 15-45 s each on 2 cores
def test_the_cache_gives_the_same_numbers_as_a_fresh_pass(eval_set, tmp_path):
    gen = eval_set.variant("noise8", noisy(8.0))
    cache = tmp_path / "cache"
    few = _two_clips(eval_set, tmp_path) + ["--frames", "9"]
    first = _run("fvd", eval_set, gen, tmp_path, *few, cache=cache)
    again = _run("fvd", eval_set, gen, tmp_path, *few, cache=cache)
    fresh = _run("fvd", eval_set, gen, tmp_path, *few)
    assert first["cache"]["computed"] == 4 and again["cache"] == {**first["cache"], "hits": 4, "computed": 0}
    assert again["value"] == first["value"] == fresh["value"] and first["clips"] == 2
    # another protocol is another cache entry, not a stale hit
    other = _run("fvd", eval_set, gen, tmp_path, *few, "--downsample", "0.5", cache=cache)
    assert other["cache"]["hits"] == 0 and other["value"] != first["value"]


@pytest.mark.slow  # I3D / InceptionV3 passes over dozens of clip-views: 15-45 s each on 2 cores
def test_several_generations_per_clip_score_against_one_real_clip_each(eval_set, tmp_path):
    gen = eval_set.variant("noise8x2", noisy(8.0), generations=2, clips=eval_set.clips[:2])
    r = _run("fvd", eval_set, gen, tmp_path, "--frames", "9")
    assert r["generations"] == [0, 1] and r["rows"] == 4 and r["real_features"] == 4 and r["generated_features"] == 8
    one = _run("fvd", eval_set, gen, tmp_path, "--frames", "9", "--generation", "1")
    assert one["generations"] == [1] and one["generated_features"] == 4 and one["value"] != r["value"]


@pytest.mark.slow  # I3D / InceptionV3 passes over dozens of clip-views: 15-45 s each on 2 cores
def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise(eval_set, tmp_path):
    few = ["--frames", "4"]
    same = _run("fid", eval_set, eval_set.gen, tmp_path, *few)
    assert abs(same["value"]) < 1e-6
    assert same["real_features"] == same["generated_features"] == 4 * 2 * 4             # clips x views x frames
    low = _run("fid", eval_set, eval_set.variant("noise8", noisy(8.0)), tmp_path, *few)
    high = _run("fid", eval_set, eval_set.variant("noise40", noisy(40.0)), tmp_path, *few)
    assert 0 < low["value"] < high["value"]
    keys = _run("fid", eval_set, eval_set.gen, tmp_path, "--keyframes-only")
    n_key = sum(p.startswith("samples/") for r in eval_set.rows for row in r["source_frames"][:16]
                for p in (row[1], row[5]))                                           # CAM_FRONT, CAM_BACK_LEFT
    assert 4 <= keys["real_features"] == keys["generated_features"] == n_key < 4 * 2 * 16
    assert abs(keys["value"]) < 1e-6 and keys["protocol"]["keyframes_only"]


def _error(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _base(es, gen):
    return ["fvd", "--generated", str(gen), "--dataroot", es.dataroot, "--weights", str(es.i3d), "--cache-dir",
            "none", "--no-progress"]


def test_a_clip_list_that_does_not_match_the_manifest(eval_set, tmp_path, capsys):
    lst = tmp_path / "clips.txt"
    lst.write_text(eval_set.rows[0]["key"] + "\nscene-9999_0000_017_224x400\n")
    err = _error(capsys, _base(eval_set, eval_set.gen) + ["--clips", str(lst)])
    assert "scene-9999_0000_017_224x400" in err and "do not match" in err
    err = _error(capsys, _base(eval_set, eval_set.gen) + ["--generation", "3"])
    assert "no generation 3" in err


def test_a_missing_real_frame_is_named(eval_set, tmp_path, capsys):
    gen = tmp_path / "gen"
    shutil.copytree(eval_set.gen, gen)
    rows = read_manifest_rows(gen)
    rows[1]["source_frames"][4][2] = "sweeps/CAM_FRONT_RIGHT/not-there.jpg"
    write_manifest(gen, rows)
    err = _error(capsys, _base(eval_set, gen))
    assert "real frame" in err and "sweeps/CAM_FRONT_RIGHT/not-there.jpg" in err and rows[1]["key"] in err


def test_a_missing_generated_frame_and_a_mixed_folder_are_named(eval_set, tmp_path, capsys):
    gen = tmp_path / "gen"
    shutil.copytree(eval_set.gen, gen)
    victim = gen / eval_set.rows[2]["dir"] / "frames" / "CAM_BACK" / "007.png"
    victim.unlink()
    err = _error(capsys, _base(eval_set, gen))
    assert str(victim) in err and "missing" in err
    rows = read_manifest_rows(eval_set.gen)
    twin = dict(rows[0], generation=1)
    twin["source_frames"] = [list(reversed(r)) for r in rows[0]["source_frames"]]
    write_manifest(gen, rows + [twin])
    err = _error(capsys, _base(eval_set, gen))
    assert rows[0]["key"] in err and "disagree" in err


def test_usage_mistakes_are_one_line(eval_set, tmp_path, capsys):
    assert "no manifest.parquet" in _error(capsys, _base(eval_set, tmp_path))
    assert "first 20" in _error(capsys, _base(eval_set, eval_set.gen) + ["--frames", "20"])
    assert "downsample" in _error(capsys, _base(eval_set, eval_set.gen) + ["--downsample", "2"])
    assert "CAM_TOP" in _error(capsys, _base(eval_set, eval_set.gen) + ["--views", "CAM_TOP"])
    with pytest.raises(SystemExit):
        main(["fvd", "--help"])


def test_a_protocol_too_small_for_the_i3d_is_refused_before_any_work(eval_set, capsys):
    err = _error(capsys, _base(eval_set, eval_set.gen) + ["--frames", "8"])
    assert "at least 9 frames" in err and "8 frames of 224x224" in err
    err = _error(capsys, _base(eval_set, eval_set.gen) + ["--crop", "0"])
    assert "56x100" in err


@pytest.mark.parametrize("script,args,words", [
    ("mdv2-eval", ["fvd", "--generated", "{d}", "--dataroot", "{d}"], "no manifest.parquet"),
    ("mdv2-eval", ["psnr"], "invalid choice"),
    ("mdv2-export-nuscenes", ["--generated", "{d}", "--dataroot", "{d}", "--out", "{d}/root"], "no manifest.parquet"),
])
def test_the_console_scripts_answer_a_mistake_with_one_line(tmp_path, script, args, words):
    import os
    import subprocess
    import sys
    exe = os.path.join(os.path.dirname(sys.executable), script)
    r = subprocess.run([exe, *[a.format(d=tmp_path) for a in args]], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "MDV2_DEBUG": ""})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], r.stderr
