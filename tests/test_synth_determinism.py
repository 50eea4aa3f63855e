"""Same arguments -> byte-identical dataset; different seed -> different; CLI and input errors."""
from __future__ import annotations

import hashlib
import json

import pyarrow.parquet as pq
import numpy as np
import pytest

from pipeline.synth.writer import main, write_dataset

SMALL = dict(scenes=1, seconds=1.0, image_size=(96, 54))


def _digest(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_identical_bytes_different_seed_differs(tmp_path):
    a = write_dataset(tmp_path / "a", seed=7, **SMALL)
    b = write_dataset(tmp_path / "b", seed=7, **SMALL)
    c = write_dataset(tmp_path / "c", seed=8, **SMALL)
    da, db, dc = _digest(a.root), _digest(b.root), _digest(c.root)
    assert da == db
    assert sum(k.endswith(".jpg") for k in da) == a.num_images == 12 * 6
    assert sum(k.startswith("v1.0-synth/") for k in da) == 13
    # different seed: different tables, images and truth
    for name in ("v1.0-synth/sample_annotation.json", "v1.0-synth/ego_pose.json", "synth_truth.parquet"):
        assert da[name] != dc[name]
    jpg_a = sorted(v for k, v in da.items() if k.endswith(".jpg"))
    jpg_c = sorted(v for k, v in dc.items() if k.endswith(".jpg"))
    assert set(jpg_a).isdisjoint(jpg_c)
    # tables are sorted-key JSON
    rec = json.loads((a.root / "v1.0-synth" / "scene.json").read_text())[0]
    assert list(rec) == sorted(rec) and rec["name"] == "synth-0000"
    assert pq.read_table(a.truth_path).num_rows > 0


def test_cli_writes_and_summarises(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "d"), "--scenes", "1", "--seconds", "1", "--image-size", "64x36",
                 "--seed", "3", "--version", "v1.0-mini-synth", "--map-name", "boston-seaport"]) == 0
    out = capsys.readouterr().out
    assert "1 scenes" in out and "72 images" in out and "boston-seaport" in out
    assert (tmp_path / "d" / "v1.0-mini-synth" / "sample.json").is_file()
    assert (tmp_path / "d" / "maps" / "expansion" / "boston-seaport.json").is_file()
    from nuscenes.nuscenes import NuScenes
    nusc = NuScenes(version="v1.0-mini-synth", dataroot=str(tmp_path / "d"), verbose=False)
    assert nusc.log[0]["location"] == "boston-seaport"


def test_cli_regular_rig_and_drop_rate(tmp_path, capsys):
    """--regular-rig: CAM_FRONT every 83 ms, nothing dropped, untilted mounts, no map holes; --drop-rate on the
    default rig drops images per camera."""
    import json
    assert main(["--out", str(tmp_path / "r"), "--scenes", "1", "--seconds", "2", "--image-size", "32x18",
                 "--regular-rig"]) == 0
    assert "144 images" in capsys.readouterr().out
    sd = json.loads((tmp_path / "r" / "v1.0-synth" / "sample_data.json").read_text())
    front = sorted(r["timestamp"] for r in sd if "__CAM_FRONT__" in r["filename"])
    assert np.all(np.abs(np.diff(front) - 83_333) <= 3_001)
    cs = json.loads((tmp_path / "r" / "v1.0-synth" / "calibrated_sensor.json").read_text())
    from pipeline.contract.geometry import quat_to_matrix
    axes = np.stack([quat_to_matrix(r["rotation"]) @ [0.0, 0.0, 1.0] for r in cs if r["camera_intrinsic"]])
    assert len(axes) == 6 and np.abs(axes[:, 2]).max() < 1e-9           # optical axes exactly horizontal
    m = json.loads((tmp_path / "r" / "maps" / "expansion" / "singapore-onenorth.json").read_text())
    assert not any(p["holes"] for p in m["polygon"])
    assert main(["--out", str(tmp_path / "d"), "--scenes", "1", "--seconds", "2", "--image-size", "32x18",
                 "--drop-rate", "0.2"]) == 0
    out = capsys.readouterr().out
    n = int(out.split(" images")[0].rsplit(" ", 1)[1])
    assert 144 - 6 * 5 <= n < 144                          # a few images per camera not recorded
    m = json.loads((tmp_path / "d" / "maps" / "expansion" / "singapore-onenorth.json").read_text())
    assert any(p["holes"] for p in m["polygon"])


def _camera_rounds(root) -> dict[str, set[int]]:
    """{channel: recorded image timestamps} from the sample_data table."""
    import json
    sd = json.loads((root / "v1.0-synth" / "sample_data.json").read_text())
    out: dict[str, set[int]] = {}
    for r in sd:
        ch = r["filename"].split("/")[1]
        if ch.startswith("CAM"):
            out.setdefault(ch, set()).add(int(r["timestamp"]))
    return out


def test_bursts_drop_runs_of_two_or_three_and_tables_only_honours_the_rig_flags(tmp_path):
    """--bursts: each camera loses its share of images in runs of 2 or 3 consecutive rounds; --tables-only writes
    the same drops (and the regular rig's none) as the full writer with the same arguments."""
    from pipeline.scenes.rounds import missing_runs
    from pipeline.synth.rig import dropped_images
    from pipeline.synth.scale import write_tables_only
    kf = np.arange(0, 240, 6)
    d = dropped_images(np.random.default_rng(0), 240, kf, 0.05, bursts=True, burst3_share=0.5)
    runs = missing_runs(np.stack([~d[c] for c in sorted(d)], 1))
    assert {n for _, _, n in runs} == {2, 3} and len(runs) > 12
    assert not any(d[c][kf].any() or d[c][0] or d[c][-1] for c in d)                   # never a keyframe or an end
    assert all(round(0.05 * 199) <= d[c].sum() <= round(0.05 * 199) + 1 for c in d)   # the rate, +1 at most
    single = dropped_images(np.random.default_rng(0), 240, kf, 0.05)
    assert 1 in {n for _, _, n in missing_runs(np.stack([~single[c] for c in sorted(single)], 1))}
    kw = dict(scenes=1, seconds=3.0, image_size=(32, 18), seed=4)
    full = write_dataset(tmp_path / "full", drop_rate=0.1, bursts=True, **kw)
    tables = write_tables_only(tmp_path / "tables", drop_rate=0.1, bursts=True, **kw)
    a, b = _camera_rounds(full.root), _camera_rounds(tables.root)
    assert a == b and sum(map(len, a.values())) < 6 * 36                           # the same images dropped
    regular = write_tables_only(tmp_path / "regular", rig="regular", drop_rate=0.1, **kw)
    assert sum(map(len, _camera_rounds(regular.root).values())) == 6 * 36 and regular.rig == "regular"


def test_explicit_drops_must_be_non_keyframes(tmp_path):
    with pytest.raises(ValueError, match="only non-keyframes"):
        write_dataset(tmp_path / "x", scenes=1, seconds=1.0, image_size=(32, 18), drop_rate=0.0,
                      drops={"CAM_BACK": [0]})


@pytest.mark.parametrize("argv, message", [
    (["--image-size", "1600by900"], "--image-size must look like"),
    (["--image-size", "8x8"], "too small"),
    (["--seconds", "0.5"], "fewer than 11 camera frames"),
    (["--scenes", "0"], "--scenes must be >= 1"),
    (["--map-name", "boston"], "invalid choice"),
    (["--drop-rate", "0.7"], "--drop-rate 0.7 must be in [0, 0.5)"),
    (["--bursts", "--burst3-share", "2"], "--burst3-share 2.0 must be in [0, 1]"),
])
def test_cli_rejects_bad_input(tmp_path, capsys, argv, message):
    assert main(["--out", str(tmp_path / "x")] + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
