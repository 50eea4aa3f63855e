"""pipeline/tools/inspect.py: CLI behaviour on factory shards and the geometry of its overlays (numeric).
The pixel check on real synthetic renders is in test_cluster_e2e.py (it needs a real build)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from factories import make_sample, write_shards
from pipeline.contract import geometry, schema
from pipeline.contract.shardio import iter_shard
from pipeline.tools import inspect


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect")
    return write_shards(out, {(64, 128, 9): 3}, per_shard=3)[0]


def test_cli_prints_meta_and_shapes_and_writes_png(shard, tmp_path, capsys):
    png = tmp_path / "p.png"
    assert inspect.main([str(shard), "--png", str(png)]) == 0
    text = capsys.readouterr().out
    assert "latent_mean.npy      float16  (6, 16, 3, 8, 16)" in text
    assert "box_view_mask.npy    bool     (9, 6, 5)" in text
    assert '"num_frames": 9' in text
    assert "objects per frame: min 4 max 5" in text
    with Image.open(png) as im:
        assert im.format == "PNG"
        # three frame rows, each two lines of views; width: label + 3 views + the BEV panel
        assert im.size[1] > 3 * 2 * 64 and im.size[0] > 3 * 128


def test_cli_key_selection_and_errors(shard, capsys):
    keys = [k for k in iter_shard(str(shard))]  # the plain tarfile reader, independent of the one under test
    second = keys[1][0]
    assert inspect.main([str(shard), "--key", second]) == 0
    assert f"key: {second}" in capsys.readouterr().out
    assert inspect.main([str(shard), "--key", "nope"]) == 2
    assert "no sample 'nope'; the shard holds 3" in capsys.readouterr().err
    assert inspect.main([str(shard) + ".missing"]) == 2


def test_filled_view_frames_are_listed_and_framed_in_red(tmp_path, capsys):
    """mdv2-inspect marks repaired drops: the text lists them, the preview adds the first frame holding one and
    frames that view in red (only that view)."""
    shard = write_shards(tmp_path / "out", {(64, 128, 9): 1}, filled=((3, 4), (3, 5), (6, 4)))[0]
    png = tmp_path / "p.png"
    assert inspect.main([str(shard), "--png", str(png)]) == 0
    assert "filled view-frames (repaired drops, fill_mask.npy): 3: t=3 CAM_BACK, t=3 CAM_BACK_LEFT, t=6 CAM_BACK" \
        in capsys.readouterr().out
    s = inspect.load_sample(str(shard))
    assert inspect.preview_frames(9, s.fill_mask) == [0, 3, 4, 8]
    img = inspect.render_preview(s)
    red = (img == inspect.FILLED_RGB).all(-1)
    clean = inspect.render_preview(inspect.load_sample(str(write_shards(tmp_path / "clean", {(64, 128, 9): 1})[0])))
    assert red.sum() > 4 * 128 and not (clean == inspect.FILLED_RGB).all(-1).any()


def test_preview_frames():
    assert inspect.preview_frames(1) == [0]
    assert inspect.preview_frames(9) == [0, 4, 8]
    assert inspect.preview_frames(17) == [0, 8, 16]


def test_bev_pixel_convention_matches_schema():
    x, y = schema.bev_cell_centres()                       # (200, 200) each
    px = inspect.lidar_to_bev_pixel(np.stack([x, y], -1))  # (200, 200, 2) (col, row)
    i, j = np.meshgrid(np.arange(200), np.arange(200), indexing="ij")
    np.testing.assert_allclose(px[..., 0], j + 0.5, atol=1e-9)
    np.testing.assert_allclose(px[..., 1], i + 0.5, atol=1e-9)


def _front_camera_sample() -> schema.Sample:
    """One view looking along LiDAR +y (ahead), one box 10 m ahead, 2 m wide, 4 m long, 1.5 m high."""
    s = make_sample(num_frames=1, height=64, width=128, num_boxes=1, views=("CAM_FRONT",), with_std=False)
    r = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], np.float64)  # cam x -> lidar x, cam z -> lidar y, cam y -> -z
    s["cam2lidar"] = geometry.make_transform(r, [0, 0, 0]).astype(np.float32)[None, None]
    s["boxes"][:] = np.array([0, 10, 0, 2, 4, 1.5, np.pi / 2], np.float32)  # heading along +y
    s["view_boxes"][:] = s["boxes"][:, None]
    s["box_mask"][:] = True
    s["box_view_mask"][:] = True
    return schema.decode_sample({f"{n}": b for n, b in schema.encode_sample(s).items()}, key=s["key"])


def test_box_outline_projection_numbers():
    s = _front_camera_sample()
    (n, uv, depth), = inspect.box_outlines(s, 0, 0)
    k = s.intrinsics[0]
    assert n == 0
    # near face at depth 8 m, far face at 12 m; x spans +-1 m, y spans +-0.75 m
    assert sorted(set(np.round(depth, 6))) == [8.0, 12.0]
    np.testing.assert_allclose(uv.min(0), [k[0, 2] - k[0, 0] * 1 / 8, k[1, 2] - k[1, 1] * 0.75 / 8], atol=1e-4)
    np.testing.assert_allclose(uv.max(0), [k[0, 2] + k[0, 0] * 1 / 8, k[1, 2] + k[1, 1] * 0.75 / 8], atol=1e-4)


def test_drawn_outline_lands_on_projection():
    s = _front_camera_sample()
    img = inspect.draw_boxes_on_view(np.zeros((64, 128, 3), np.uint8), s, 0, 0)
    ys, xs = np.nonzero(img.any(-1))
    (_, uv, _), = inspect.box_outlines(s, 0, 0)
    assert xs.min() >= np.floor(uv[:, 0].min()) - 1 and xs.max() <= np.ceil(uv[:, 0].max()) + 1
    assert ys.min() >= np.floor(uv[:, 1].min()) - 1 and ys.max() <= np.ceil(uv[:, 1].max()) + 1
    assert tuple(img[ys[0], xs[0]]) != (0, 0, 0)
    colour = inspect.CLASS_RGB[int(s.box_class[0])]
    assert any(np.abs(img[y, x].astype(int) - colour).max() < 5 for y, x in zip(ys, xs))


def test_bev_box_drawn_ahead_of_ego():
    s = _front_camera_sample()
    s.bev[:] = 0
    img = inspect.draw_bev(s, 0, size=200)                # 1 px per cell
    ys, xs = np.nonzero((img != 30).any(-1) & ~(img == 255).all(-1))  # drawn box pixels (not ego, not map)
    # box centre 10 m ahead -> row 100 - 20 = 80; spans x +-1 m -> cols 98..102, y 8..12 m -> rows 76..84
    assert 75 <= ys.min() and ys.max() <= 85 and 96 <= xs.min() and xs.max() <= 104


def test_vae_decoded_views(tmp_path):
    """--vae: the latents go through a real (tiny, random) AutoencoderKLCogVideoX back to frames per view."""
    import torch
    from pipeline.shards.vae import write_tiny_vae
    torch.set_num_threads(1)
    vae = write_tiny_vae(tmp_path / "vae")
    image_shard = write_shards(tmp_path / "out", {(64, 128, 1): 1})[0]  # T=1 keeps the decode cheap
    s = inspect.load_sample(str(image_shard))
    frames = inspect.decode_latents(s, vae)
    assert frames.shape == (6, 1, 64, 128, 3) and frames.dtype == np.uint8
    png = tmp_path / "v.png"
    assert inspect.main([str(image_shard), "--vae", vae, "--png", str(png)]) == 0
    with Image.open(png) as im:
        assert im.size[1] > 2 * 64
