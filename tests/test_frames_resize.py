"""pipeline/shards/frames.py: decode + resize + top crop, geometry agreement with the intrinsics, clear errors."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.contract import geometry
from pipeline.shards.frames import FrameError, decode_frames, decode_resize_crop, full_decode_resize_crop, resized_height


def _jpeg(path, w=1600, h=900, dot=None, quality=95):
    rng = np.random.default_rng(0)
    img = (rng.integers(0, 40, (h, w, 3))).astype(np.uint8)
    img += np.linspace(0, 120, w, dtype=np.uint8)[None, :, None]  # a gradient so resizing has content
    if dot is not None:
        u, v, r = dot
        img[v - r:v + r, u - r:u + r] = 255
    Image.fromarray(img).save(path, quality=quality)
    return path


def test_dot_lands_where_the_cropped_intrinsics_project_it(tmp_path):
    # a 3D point straight ahead projects to (1100, 700) with K0 at 1600x900
    k0 = np.array([[1266.0, 0, 800.0], [0, 1266.0, 450.0], [0, 0, 1]])
    p_cam = np.array([(1100 - 800) / 1266.0, (700 - 450) / 1266.0, 1.0]) * 10
    path = _jpeg(tmp_path / "a.jpg", dot=(1100, 700, 12))
    for w, h in ((800, 424), (400, 224), (128, 64)):
        img = decode_resize_crop(str(path), w, h)
        assert img.shape == (h, w, 3) and img.dtype == np.uint8
        k = geometry.resize_crop_intrinsics(k0, (1600, 900), w, h)
        uv, _ = geometry.project(p_cam[None], k)
        bright = np.argwhere(img.min(-1) > 200)  # (row, col) of the dot
        centre = bright.mean(0)[::-1] + 0.5      # pixel centres -> continuous coords
        assert np.allclose(centre, uv[0], atol=1.0), (w, h, centre, uv[0])


def test_draft_decode_matches_full_decode(tmp_path):
    path = str(_jpeg(tmp_path / "b.jpg"))
    for w, h in ((800, 424), (400, 224)):
        a = decode_resize_crop(path, w, h, draft=True).astype(float)
        b = full_decode_resize_crop(path, w, h).astype(float)
        psnr = 10 * np.log10(255 ** 2 / np.mean((a - b) ** 2))
        assert psnr > 35, (w, psnr)
    assert resized_height((1600, 900), 800) == 450


def test_bad_files_raise_frame_error_naming_the_file(tmp_path):
    good = _jpeg(tmp_path / "ok.jpg", 400, 225)
    data = good.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    (tmp_path / "junk.jpg").write_bytes(b"not a jpeg at all" * 10)
    for name, word in (("missing.jpg", "missing"), ("cut.jpg", "corrupt"), ("junk.jpg", "corrupt")):
        with pytest.raises(FrameError, match=word) as e:
            decode_resize_crop(str(tmp_path / name), 128, 64)
        assert name in str(e.value)
    with pytest.raises(FrameError, match="fewer than the bucket height"):
        decode_resize_crop(str(good), 128, 80)  # 400x225 -> 128x72 < 80 rows


def test_decode_frames_once_per_path_and_collects_errors(tmp_path):
    _jpeg(tmp_path / "x.jpg", 400, 225)
    fs = decode_frames(str(tmp_path), ["x.jpg", "gone.jpg", "x.jpg"], 128, 64)
    assert fs.paths == ["gone.jpg", "x.jpg"] and fs.pixels.shape == (2, 64, 128, 3)
    assert set(fs.errors) == {"gone.jpg"} and "missing" in fs.errors["gone.jpg"]
    assert fs.pixels[1].max() > 0 and fs.pixels[0].max() == 0
