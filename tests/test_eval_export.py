"""mdv2-export-nuscenes: generated clips written back into a nuScenes dataroot that the real devkit loads, every
replaced image the generated frame (checked after undoing the resize / top crop, within JPEG tolerance), every
other file a link to a byte-identical source, eval_tokens.json exactly the keyframes inside each clip's first
16 frames."""
from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from factories_eval import clip_rows, negative, write_generations, write_manifest
from pipeline.shards.frames import decode_resize_crop, resized_height
from train.eval import linktree
from train.eval.export import main
from train.eval.uncrop import restore, top_rows

BIG, SMALL = (224, 400), (64, 128)     # (H, W); the synthetic cameras are 400x225


def _forward(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """The pipeline's geometry on an in-memory image: area resize to width W, drop the top rows down to H."""
    rh = resized_height((img.shape[1], img.shape[0]), width)
    return cv2.resize(img, (width, rh), interpolation=cv2.INTER_AREA)[rh - height:]


# ---- the inverse geometry ------------------------------------------------------------------------------------

def test_848x1600_goes_back_to_1600x900_with_52_black_rows_and_the_pixels_unchanged():
    frame = np.random.default_rng(0).integers(1, 256, (848, 1600, 3), dtype=np.uint8)
    full = restore(frame, (1600, 900))
    assert full.shape == (900, 1600, 3) and top_rows((1600, 900), 1600, 848) == 52
    assert not full[:52].any() and np.array_equal(full[52:], frame)       # the authors' Pad([0, 52, 0, 0])
    assert np.array_equal(_forward(full, 1600, 848), frame)               # and the pipeline takes them off again


@pytest.mark.parametrize("size,source", [((64, 128), (400, 225)), ((224, 400), (1600, 900)), ((424, 800), (1600, 900))])
def test_restore_inverts_the_pipelines_resize_and_crop(size, source):
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    frame = np.stack([xx * 255 / w, 128 + 100 * np.sin(yy / 3.0), 128 + 60 * np.sin(xx / 3.0)], -1).astype(np.uint8)
    full = restore(frame, source)
    assert full.shape == (source[1], source[0], 3)
    back = _forward(full, w, h).astype(float)
    assert np.abs(back - frame).mean() < 2.0
    # a broken inverse (the black rows at the bottom instead of the top) fails the same check
    wrong = np.roll(full, -top_rows(source, w, h), axis=0)
    if top_rows(source, w, h):
        assert np.abs(_forward(wrong, w, h).astype(float) - frame).mean() > 5


def test_top_rows_real_keeps_the_original_rows():
    orig = np.full((900, 1600, 3), 77, np.uint8)
    full = restore(np.zeros((848, 1600, 3), np.uint8), (1600, 900), "real", orig)
    assert (full[:52] == 77).all() and not full[52:].any()


# ---- the export --------------------------------------------------------------------------------------------

class Exported:
    def __init__(self, root: Path, synth):
        self.dataroot, self.version = str(synth.root), synth.version
        s0, s1 = synth.scene_names
        # two clips of scene 0 overlap in frames 10..16: the earlier key keeps them
        self.big = [(s0, 0, 17), (s0, 10, 17), (s1, 5, 17)]
        self.small = [(s1, 40, 17)]
        self.gen = root / "gen"
        rows = write_generations(self.gen, self.dataroot, self.version, self.big, *BIG, frame_fn=negative)
        rows += write_generations(self.gen, self.dataroot, self.version, self.small, *SMALL, frame_fn=negative)
        write_manifest(self.gen, rows)
        self.rows = sorted(rows, key=lambda r: r["key"])
        self.out = root / "root"
        rc = main(["--generated", str(self.gen), "--dataroot", self.dataroot, "--out", str(self.out), "--no-progress",
                   "--workers", "2"])
        assert rc == 0
        # which generated frame each source image must carry (earlier key first, own frames only)
        self.claims: dict[str, tuple[dict, int, int]] = {}
        for r in self.rows:
            for t, row in enumerate(r["source_frames"]):
                for j, rel in enumerate(row):
                    self.claims.setdefault(rel, (r, t, j))


@pytest.fixture(scope="module")
def exported(synth_dataset, tmp_path_factory):
    return Exported(tmp_path_factory.mktemp("export"), synth_dataset)


def test_the_devkit_loads_the_root_and_every_replaced_image_is_the_generated_frame(exported):
    from nuscenes.nuscenes import NuScenes
    nusc = NuScenes(version=exported.version, dataroot=str(exported.out), verbose=False)
    token_of = {sd["filename"]: sd["token"] for sd in nusc.sample_data}
    assert len(exported.claims) == 6 * (17 * 4 - 7)                      # 4 clips, 7 frames shared
    for rel, (r, t, j) in exported.claims.items():
        path = nusc.get_sample_data_path(token_of[rel])
        assert path == os.path.join(str(exported.out), rel) and os.path.isfile(path) and not os.path.islink(path)
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.size == (400, 225)
        h, w = r["height"], r["width"]
        gen = np.asarray(Image.open(exported.gen / r["dir"] / "frames" / r["views"][j] / f"{t:03d}.png"), float)
        back = decode_resize_crop(path, w, h).astype(float)
        err = np.abs(back - gen)
        # JPEG q95 alone (224x400: no resize) or with the bicubic-up / area-down round trip (64x128); the first row
        # borders the black band, where JPEG rings
        mean, p99 = (0.5, 6) if w == 400 else (2.5, 40)
        assert err[1:].mean() < mean and np.percentile(err[1:], 99) < p99 and err[0].mean() < 25, (rel, err.mean())
        src = decode_resize_crop(os.path.join(exported.dataroot, rel), w, h).astype(float)
        assert np.abs(src - gen).mean() > 30                              # a negative: replaced, not linked
        top = top_rows((400, 225), w, h)
        full = np.asarray(Image.open(path), float)
        assert full[:top].mean() < 3 and (top == 0 or full[top:].mean() > 20)   # the cropped rows are black


def _files(root: str) -> dict[str, str]:
    out = {}
    for d, _, names in os.walk(root, followlinks=True):
        for n in names:
            p = os.path.join(d, n)
            out[os.path.relpath(p, root)] = p
    return out


def test_every_other_file_is_a_link_to_the_identical_source_and_the_tables_are_unchanged(exported):
    src, dst = _files(exported.dataroot), _files(str(exported.out))
    assert set(dst) == set(src) | {"export.json", "eval_tokens.json"}
    for rel, p in src.items():
        if rel in exported.claims:
            continue
        assert os.path.realpath(dst[rel]) == os.path.realpath(p), rel        # reached through a symlink
        assert Path(dst[rel]).read_bytes() == Path(p).read_bytes(), rel
    tables = [r for r in src if r.startswith(exported.version + "/")]
    assert len(tables) == 13 and all(Path(dst[r]).read_bytes() == Path(src[r]).read_bytes() for r in tables)
    # the only regular files written are the replaced images and the two reports
    regular = {os.path.relpath(os.path.join(d, n), exported.out) for d, _, ns in os.walk(exported.out)
               for n in ns if not os.path.islink(os.path.join(d, n))}
    assert regular == set(exported.claims) | {"export.json", "eval_tokens.json"}
    assert os.path.islink(exported.out / exported.version) and os.path.islink(exported.out / "maps")


def test_eval_tokens_are_the_keyframes_inside_each_clips_first_16_frames(exported):
    doc = json.loads((exported.out / "eval_tokens.json").read_text())
    assert doc["generation"] == 0 and doc["eval_frames"] == 16 and doc["version"] == exported.version
    want: dict[str, list[str]] = {}
    taken = set()
    for scene, start, t_len in sorted(exported.big + exported.small, key=lambda c: (c[0], c[1])):
        tokens = clip_rows(exported.dataroot, exported.version, scene, start, t_len)["sample_tokens"]
        key = next(r["key"] for r in exported.rows if r["key"].startswith(f"{scene}_{start:04d}_"))
        mine = [tok for tok in tokens[:16] if tok and tok not in taken]
        taken.update(tok for tok in tokens if tok)
        if mine:
            want[key] = mine
    assert doc["clips"] == want and doc["sample_tokens"] == [s for v in want.values() for s in v]
    assert all(2 <= len(v) <= 3 for k, v in want.items() if "_0010_" not in k)   # keyframes every 6 frames
    summary = json.loads((exported.out / "export.json").read_text())
    assert summary["complete"] and summary["replaced_images"] == len(exported.claims)
    assert summary["frames_not_written"] == 6 * 7 and summary["link_mode"] == "symlink"


def test_a_rerun_completes_and_other_arguments_are_refused(exported, capsys):
    victim = exported.out / next(iter(sorted(exported.claims)))
    victim.unlink()                                                         # an interrupted run
    base = ["--generated", str(exported.gen), "--dataroot", exported.dataroot, "--out", str(exported.out),
            "--no-progress"]
    assert main(base) == 0
    assert json.loads((exported.out / "export.json").read_text())["written_now"] == 1 and victim.is_file()
    assert main(base + ["--jpeg-quality", "80"]) == 2
    assert "other arguments" in capsys.readouterr().err


def test_hardlink_mode_links_each_file(exported, tmp_path):
    last = exported.rows[-1]                                               # the 64x128 clip alone
    out = tmp_path / "hard"
    rc = main(["--generated", str(exported.gen), "--dataroot", exported.dataroot, "--out", str(out),
               "--no-progress", "--link", "hardlink", "--clips", str(_list(tmp_path, last["key"]))])
    assert rc == 0
    replaced = {rel for row in last["source_frames"] for rel in row}
    for rel, p in _files(exported.dataroot).items():
        q = out / rel
        assert not q.is_symlink() and not q.parent.is_symlink()
        same_inode = os.stat(q).st_ino == os.stat(p).st_ino
        assert same_inode == (rel not in replaced), rel


def _list(tmp_path, *keys) -> Path:
    p = tmp_path / "clips.txt"
    p.write_text("\n".join(keys) + "\n")
    return p


def _err(capsys, argv) -> str:
    rc = main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_input_mistakes_are_one_line(exported, tmp_path, capsys):
    base = ["--generated", str(exported.gen), "--dataroot", exported.dataroot, "--no-progress"]
    assert "overlap" in _err(capsys, base + ["--out", os.path.join(exported.dataroot, "gen_root")])
    assert "not an export" in _err(capsys, base + ["--out", str(exported.gen)])
    assert "no generation 2" in _err(capsys, base + ["--out", str(tmp_path / "a"), "--generation", "2"])
    assert "do not match" in _err(capsys, base + ["--out", str(tmp_path / "b"), "--clips",
                                                  str(_list(tmp_path, "scene-7777_0000_017_64x128"))])
    bad = tmp_path / "gen"
    rows = [dict(r) for r in exported.rows]
    rows[0]["source_frames"] = [list(x) for x in rows[0]["source_frames"]]
    rows[0]["source_frames"][3][1] = "samples/CAM_FRONT/absent.jpg"
    bad.mkdir()
    write_manifest(bad, rows)
    err = _err(capsys, ["--generated", str(bad), "--dataroot", exported.dataroot, "--out", str(tmp_path / "c")])
    assert "samples/CAM_FRONT/absent.jpg" in err and "missing" in err
    assert not (tmp_path / "c").exists()


def test_linktree_never_writes_through_a_link(tmp_path):
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "x.jpg").write_bytes(b"x")
    (src / "c.txt").write_text("c")
    out = tmp_path / "out"
    assert linktree.build(str(src), str(out), set()) == 2                 # a/ and c.txt
    assert os.path.islink(out / "a")
    with pytest.raises(linktree.cli.BadInput, match="is a link"):
        linktree.build(str(src), str(out), {"a/b/x.jpg"})
    assert (src / "a" / "b" / "x.jpg").read_bytes() == b"x"


def test_plan_prefers_a_frames_own_exposure_then_the_earlier_clip():
    from train.eval.export import Claim, eval_tokens, plan
    from train.eval.generated import Generation
    from train.eval.nusc_index import CameraIndex
    views = ("CAM_FRONT", "CAM_BACK")
    # clip A: frame 1 of CAM_BACK is a repaired drop that reuses frame 2's image b2
    a = Generation("a", 0, 1024, 3, 8, 16, views, (("f0", "b0"), ("f1", "b2"), ("f2", "b2")), ((16, 9),) * 2,
                   ((False, False), (False, True), (False, False)), "a/g00")
    # clip B overlaps A's last frame and then goes on
    b = Generation("b", 0, 1024, 2, 8, 16, views, (("f2", "b2"), ("f3", "b3")), ((16, 9),) * 2,
                   ((False, False), (False, False)), "b/g00")
    claims, lost = plan([a, b])
    assert claims["b2"] == Claim(False, "a", 2, "CAM_BACK")          # its own exposure, not the repaired drop
    assert claims["f2"] == Claim(False, "a", 2, "CAM_FRONT") and claims["f3"].key == "b"
    assert lost == 3                                                # a's drop at t=1, b's f2 and b2
    index = CameraIndex({}, {"s0": {"CAM_FRONT": "f0", "CAM_BACK": "b0"}, "s2": {"CAM_FRONT": "f2", "CAM_BACK": "b2"},
                             "s3": {"CAM_FRONT": "f3", "CAM_BACK": "b3"}, "sx": {"CAM_FRONT": "f1", "CAM_BACK": "zz"}})
    assert eval_tokens(index, claims, eval_frames=16) == {"a": ["s0", "s2"], "b": ["s3"]}
    assert eval_tokens(index, claims, eval_frames=2) == {"a": ["s0"], "b": ["s3"]}   # a's t=2 is outside
