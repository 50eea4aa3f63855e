"""Captioning a folder of new clips: multi-view mp4s, jpg sequences, single-view videos."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from captions.cli import main
from captions.config import CaptionConfig, CaptionConfigError
from captions.table import read_captions
from captions.videos import folder_items, middle_frame_video
from tests.factories_captions import write_jpeg, write_mp4
from tests.openai_server import FakeOpenAI

GREYS = [10, 60, 110, 160, 210]  # frame i of a 5-frame video is grey level GREYS[i]; middle = index 2


def mean_of(jpeg: bytes) -> float:
    return float(np.asarray(Image.open(io.BytesIO(jpeg)).convert("L")).mean())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    for clip, shift in (("drive_a", 0), ("drive_b", 20)):   # 3-view mp4 clips
        for v, view in enumerate(("CAM_FRONT_RIGHT", "CAM_FRONT", "CAM_FRONT_LEFT")):
            write_mp4(root / clip / f"{view}.mp4", [(g + shift, g + shift, g + shift) for g in GREYS])
    for v, view in enumerate(("left", "right")):            # 2-view jpg sequences, 3 frames each
        for i, g in enumerate((30, 130, 230)):
            write_jpeg(root / "seq_c" / view / f"{i:05d}.jpg", (g, g, g))
    write_mp4(root / "single_d.mp4", [(g, g, g) for g in GREYS])  # single-view video
    (root / "notes.txt").write_text("not a clip")
    return root


def test_middle_frame_of_an_mp4_is_decoded_exactly(folder):
    for shift, clip in ((0, "drive_a"), (20, "drive_b")):
        assert abs(mean_of(middle_frame_video(folder / clip / "CAM_FRONT.mp4")) - (GREYS[2] + shift)) < 4


def test_folder_layouts_and_view_order(folder):
    items = {it.key: it for it in folder_items(folder)}
    assert sorted(items) == ["drive_a", "drive_b", "seq_c", "single_d"]
    views = items["drive_a"].load_views()
    assert [v.label for v in views] == ["CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT"]  # schema.VIEWS order
    seq = items["seq_c"].load_views()
    assert [v.label for v in seq] == ["left", "right"]
    assert [v.data for v in seq] == [(folder / "seq_c" / w / "00001.jpg").read_bytes() for w in ("left", "right")]
    assert [v.label for v in items["single_d"].load_views()] == ["video"]
    with pytest.raises(FileNotFoundError, match="VIEW"):
        folder_items(folder / "missing")


def test_cli_folder_captions_into_a_table(folder, tmp_path, capsys):
    table = tmp_path / "caps.parquet"
    with FakeOpenAI() as srv:
        args = ["folder", str(folder), "--out", str(table), "--base-url", srv.base_url, "--model", srv.model,
                "--tile-width", "64", "--quiet"]
        assert main(args) == 0
        assert srv.errors == [] and srv.requests == 4
        assert sorted(e["images"] for e in srv.log) == [1, 1, 1, 1]  # multi-view -> one mosaic
        assert main(args) == 0 and srv.requests == 4  # cached
    rows = read_captions(str(table)).to_pylist()
    assert sorted(r["key"] for r in rows) == ["drive_a", "drive_b", "seq_c", "single_d"]
    assert all(r["source"] == "mllm" and r["text"].startswith("An overcast") for r in rows)
    assert len({r["text"] for r in rows}) == 4
    assert not (tmp_path / "caps.quarantine.parquet").exists()  # nothing failed: no empty quarantine file
    assert "4 clips" in capsys.readouterr().out


def test_folder_rejects_dataset_mode(folder, tmp_path):
    from captions.videos import caption_folder
    with pytest.raises(CaptionConfigError, match="--mode mllm"):
        caption_folder(folder, str(tmp_path / "t.parquet"), CaptionConfig(mode="dataset"))
    res = caption_folder(folder, str(tmp_path / "t.parquet"), CaptionConfig(mode="none"), progress=False)
    assert res.captions["drive_a"] == ("", {"source": "none", "prompt_version": None, "model": None})
