"""The evaluation protocol's geometry: which frames, the x0.25 downsample, VideoGPT's crop, and the real
frames brought to the generated geometry by the pipeline's own resize + top crop."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from train.eval.generated import Generation
from train.eval.protocol import (FID_PROTOCOL, FVD_PROTOCOL, Protocol, centre_crop, downsample, downsampled_size,
                                 frame_indices, i3d_input, prepare)
from train.eval.realframes import read_real


def test_an_848x1600_clip_becomes_16_frames_of_212x400_then_224x224():
    clip = np.random.default_rng(0).integers(0, 256, (17, 848, 1600, 3), dtype=np.uint8)
    idx = frame_indices(clip.shape[0], FVD_PROTOCOL)
    assert idx == list(range(16))                                   # 17 generated frames cut to 16
    small = downsample(clip[idx], FVD_PROTOCOL.downsample)
    assert small.shape == (16, 212, 400, 3) and small.dtype == np.uint8
    x = prepare(clip[idx], FVD_PROTOCOL)
    assert x.shape == (16, 3, 224, 224) and x.dtype == torch.float32
    v = i3d_input(clip[idx], FVD_PROTOCOL)
    assert v.shape == (3, 16, 224, 224)
    assert torch.equal(v, (x * 2 - 1).permute(1, 0, 2, 3))                # (C, T, H, W) in [-1, 1]
    white, black = np.full((2, 848, 1600, 3), 255, np.uint8), np.zeros((2, 848, 1600, 3), np.uint8)
    assert torch.allclose(i3d_input(white, FVD_PROTOCOL), torch.tensor(1.0))
    assert torch.allclose(i3d_input(black, FVD_PROTOCOL), torch.tensor(-1.0))


def test_the_downsample_is_pil_bicubic_at_the_toolkits_truncated_size():
    assert downsampled_size(848, 1600, 0.25) == (212, 400)
    assert downsampled_size(900, 1600, 0.25) == (225, 400)
    assert downsampled_size(225, 401, 0.5) == (112, 200)           # int(), not round()
    img = np.random.default_rng(1).integers(0, 256, (1, 64, 128, 3), dtype=np.uint8)
    want = np.asarray(Image.fromarray(img[0]).resize((32, 16), Image.BICUBIC))
    assert np.array_equal(downsample(img, 0.25)[0], want)


def test_videogpt_crop_resizes_the_shorter_side_and_keeps_the_centre():
    # 212x400 -> shorter side 224: 224 x ceil(400 * 224 / 212) = 224 x 423, then columns 99..322
    h, w = 212, 400
    cols = torch.arange(w, dtype=torch.float32).expand(1, 3, h, w) / w   # value = column / width
    out = centre_crop(cols, 224)
    assert out.shape == (1, 3, 224, 224)
    up = torch.nn.functional.interpolate(cols, size=(224, 423), mode="bilinear", align_corners=False)
    assert torch.equal(out, up[..., :, 99:99 + 224])
    # the crop is centred: its middle column sees the source's middle
    assert float(out[0, 0, 0, 112]) == pytest.approx(0.5, abs=2 / w)


def test_frames_and_protocol_bounds():
    assert frame_indices(9, Protocol(frames=None)) == list(range(9))
    with pytest.raises(ValueError, match="first 16"):
        frame_indices(9, FVD_PROTOCOL)
    for bad in (Protocol(frames=0), Protocol(downsample=0.0), Protocol(downsample=1.5), Protocol(crop=0)):
        with pytest.raises(ValueError):
            bad.check()
    # FID: no downsample, no crop (pytorch-fid resizes to 299 itself)
    frames = np.zeros((2, 64, 128, 3), np.uint8)
    assert prepare(frames, FID_PROTOCOL).shape == (2, 3, 64, 128)


def test_real_frames_come_to_the_generated_geometry_by_the_pipelines_resize_and_top_crop(tmp_path):
    """A 1600x900 original for an 848x1600 clip: its bottom 848 rows (the 52 top rows cropped), at width
    1600; for a 224x400 clip: resized to 400x225, the top row cropped."""
    rng = np.random.default_rng(2)
    rows = np.linspace(0, 255, 900)[:, None, None] * np.ones((1, 1600, 3))      # value encodes the row
    orig = np.clip(rows + rng.normal(0, 2, rows.shape), 0, 255).astype(np.uint8)
    rel = "samples/CAM_FRONT/x.jpg"
    (tmp_path / "samples" / "CAM_FRONT").mkdir(parents=True)
    Image.fromarray(orig).save(tmp_path / rel, quality=95)
    g = Generation("k", 0, 1024, 1, 848, 1600, ("CAM_FRONT",), ((rel,),), ((1600, 900),), ((False,),), "k/g00")
    real = read_real(str(tmp_path), g, "CAM_FRONT", [0])
    assert real.shape == (1, 848, 1600, 3)
    assert np.abs(real[0].astype(float) - orig[52:].astype(float)).mean() < 2.5
    assert np.abs(real[0].astype(float) - orig[:848].astype(float)).mean() > 10   # not the top rows
    g2 = Generation("k", 0, 1024, 1, 224, 400, ("CAM_FRONT",), ((rel,),), ((1600, 900),), ((False,),), "k/g00")
    small = read_real(str(tmp_path), g2, "CAM_FRONT", [0])
    assert small.shape == (1, 224, 400, 3)
    want = np.asarray(Image.fromarray(orig).resize((400, 225), Image.BOX))[1:]
    assert np.abs(small[0].astype(float) - want.astype(float)).mean() < 2.5
