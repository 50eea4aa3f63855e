"""Schema 2.0 conditions through the loader (per-view boxes, per-frame extrinsics) and any 4k+1
length: the "full" bucket's common prefix, a 4k+1 shard into the model, the sampler's crop/hold."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.contract import schema
from pipeline.contract.shardio import write_shard
from tests.factories import make_sample
from train import clip_length
from train.config import DataConfig
from train.data import BatchStream, collate, decode, find_shards

VIEWS = schema.VIEWS[:3]
STAGE = """name: t
buckets:
  - {height: 32, width: 64, num_frames: full, batch_size: 2}
"""


def _sample(t: int, seed: int, start: int = 0) -> dict:
    """A factory sample whose extrinsics move with the frame (the ego drives on between exposures)."""
    s = make_sample(scene_name=f"synth-{seed:04d}", start=start, num_frames=t, height=32, width=64,
                    num_boxes=3, views=VIEWS, seed=seed)
    s["cam2lidar"][:, :, 1, 3] = 0.1 * np.arange(t)[:, None] + 0.01 * np.arange(len(VIEWS))[None]
    return s


def _raw(s: dict) -> dict:
    return dict(schema.encode_sample(s), __key__=s["key"], __url__="mem")


@pytest.fixture(scope="module")
def full_shards(tmp_path_factory) -> Path:
    """A "full" bucket of 13-frame clips (4k+1, not a pipeline bucket length)."""
    root = tmp_path_factory.mktemp("full")
    samples = [_sample(13, seed=i, start=20 * i) for i in range(4)]
    write_shard(root / schema.shard_path("train", 32, 64, "full", 0),
                sorted((s["key"], schema.encode_sample(s)) for s in samples))
    (root / "stage.yaml").write_text(STAGE)
    return root


def test_loader_keeps_per_view_boxes_and_per_frame_extrinsics(full_shards):
    cfg = DataConfig(root=str(full_shards), stage=str(full_shards / "stage.yaml"), samples_per_chunk=4,
                     shuffle_buffer=2)
    batch = next(iter(BatchStream(find_shards(cfg, "train", []), cfg, seed=0, stop_step=1)))
    B, V, T = 2, len(VIEWS), 13
    assert batch.bucket == "32x64_tfull" and batch.latent_mean.shape[3] == schema.latent_frames(T)
    assert batch.view_boxes.shape == (B, T, V, 3, 7) and batch.cam2lidar.shape == (B, T, V, 4, 4)
    for i, key in enumerate(batch.keys):
        want = _sample(13, seed=int(key.split("_")[0].split("-")[1]), start=int(key.split("_")[1]))
        np.testing.assert_array_equal(batch.view_boxes[i].numpy(), want["view_boxes"])   # not the reference boxes
        np.testing.assert_array_equal(batch.cam2lidar[i].numpy(), want["cam2lidar"])     # every frame, every view
        np.testing.assert_array_equal(batch.boxes[i].numpy(), want["boxes"])
    assert not torch.equal(batch.view_boxes[:, :, 1], batch.boxes)                       # views differ from CAM_FRONT's
    cond = batch.conditions(torch.zeros(B, 4, 32), torch.ones(B, 4, dtype=torch.bool))
    cond.check()
    assert torch.equal(cond.cam2lidar, batch.cam2lidar) and torch.equal(cond.view_boxes, batch.view_boxes)
    # ... and the 13-frame batch trains the model
    from model.registry import build_model
    torch.manual_seed(0)
    m = build_model("tiny")
    z = batch.sample_latents(torch.Generator().manual_seed(0))
    out = m(z, torch.tensor([0.3, 0.7]), cond)
    out.square().mean().backward()
    assert out.shape == z.shape == (B, V, 16, 4, 4, 8) and m.frame_embedder.final_proj.weight.grad is not None


@pytest.mark.parametrize("lengths,want", [((9, 17), (9, True)), ((17, 33, 25), (17, True)),
                                          ((13, 21), (13, True)), ((13, 17), (13, False)),
                                          ((13, 13), (13, True)), ((1, 9), (1, False))])
def test_common_prefix_is_exact_where_cogvae_chunks_allow(lengths, want):
    assert clip_length.common_prefix(list(lengths)) == want


def test_vae_prefix_exact_follows_diffusers_frame_batches():
    # AutoencoderKLCogVideoX._encode: batches [0, 8 + T%8), then 8 frames each
    assert [t for t in range(1, 34, 4) if clip_length.vae_prefix_exact(33, t)] == [9, 17, 25, 33]
    assert [t for t in range(1, 30, 4) if clip_length.vae_prefix_exact(29, t)] == [13, 21, 29]
    assert [t for t in range(1, 14, 4) if clip_length.vae_prefix_exact(13, t)] == [13]


def test_full_bucket_collate_crops_every_member_to_the_common_prefix(caplog):
    a, b = decode(_raw(_sample(13, seed=1))), decode(_raw(_sample(21, seed=2)))
    batch = collate([a, b], 0, "32x64_tfull")
    T, Tl = 13, schema.latent_frames(13)
    assert batch.view_boxes.shape[1] == batch.cam2lidar.shape[1] == batch.traj.shape[1] == batch.bev.shape[1] == T
    assert batch.box_mask.shape[1] == batch.box_view_mask.shape[1] == batch.boxes.shape[1] == T
    assert batch.latent_mean.shape[3] == batch.latent_std.shape[3] == Tl
    np.testing.assert_array_equal(batch.cam2lidar[1].numpy(), b["cam2lidar"][:T])
    np.testing.assert_array_equal(batch.view_boxes[1].numpy(), b["view_boxes"][:T])
    np.testing.assert_array_equal(batch.latent_mean[1].numpy(), b["latent_mean"][:, :, :Tl])
    with caplog.at_level(logging.WARNING, logger="train.data"):
        collate([a, decode(_raw(_sample(17, seed=3)))], 0, "32x64_tfull")
    assert "no exact CogVAE prefix" in caplog.text


def test_fit_frames_crops_and_holds():
    s = decode(_raw(_sample(9, seed=4)))
    longer = clip_length.fit_frames(s, 13)
    assert longer["shape"] == (32, 64, 13) and longer["latent_mean"].shape[2] == 4
    for name in clip_length.PER_FRAME:
        np.testing.assert_array_equal(longer[name][:9], s[name])
        for t in range(9, 13):                      # the last frame held: ego stopped, objects kept
            np.testing.assert_array_equal(longer[name][t], s[name][8])
    np.testing.assert_array_equal(longer["latent_mean"][:, :, 3], s["latent_mean"][:, :, 2])
    shorter = clip_length.fit_frames(s, 5)
    assert shorter["shape"] == (32, 64, 5) and shorter["view_boxes"].shape[0] == 5
    assert shorter["latent_mean"].shape[2] == 2
    assert clip_length.fit_frames(s, 9) is s
    with pytest.raises(ValueError, match="4k\\+1"):
        clip_length.fit_frames(s, 11)


def test_decode_of_an_even_latent_count_keeps_frame_timing(tmp_path):
    """T = 13 (T' = 4): diffusers would decode 16 frames; the sampler pads one latent and cuts back
    to 13, and the first 9 frames are exactly the decode of the first 3 latents (same VAE batches)."""
    from pipeline.shards.vae import write_tiny_vae
    from train.sample import decode_latents
    write_tiny_vae(tmp_path / "vae")
    lat = torch.randn(1, 16, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    frames = decode_latents(str(tmp_path / "vae"), lat, 1.0, "cpu")
    assert frames.shape == (1, 13, 32, 32, 3)
    np.testing.assert_array_equal(frames[:, :9], decode_latents(str(tmp_path / "vae"), lat[:, :, :3], 1.0, "cpu"))


def test_contact_sheet_draws_each_views_boxes_through_its_own_extrinsics(tmp_path):
    """Two views with the same rotation; view 1 fired later, after the ego moved 5 m to the left,
    and its boxes moved with it. Each view's box must land on its image centre: drawing view 1
    with view 0's extrinsics or boxes would put it ~16 px off."""
    from PIL import Image
    from train.video import CLASS_COLOURS, contact_sheet
    k = np.array([[32.0, 0, 32.0], [0, 32.0, 16.0], [0, 0, 1]])
    r = np.array([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]])            # camera z (forward) = LiDAR x
    c2l = np.tile(np.eye(4), (2, 1, 1))
    c2l[:, :3, :3] = r
    c2l[1, 1, 3] = 5.0
    boxes = np.array([[[10.0, 0, 0, 2, 2, 2, 0]], [[10.0, 5, 0, 2, 2, 2, 0]]])   # (V, N, 7)
    path = contact_sheet(tmp_path / "s.png", np.zeros((2, 32, 64, 3), np.uint8), boxes, np.array([True]),
                         np.array([0]), np.stack([k, k]), c2l, ["A", "B"])
    from pipeline.tools.panels import LINE_PX, PAD_PX, readable_scale
    sheet = np.asarray(Image.open(path))
    s = readable_scale(64)                          # views are enlarged to >= 320 px, each framed by 1 px
    tile_w, tile_h = 64 * s + 2, 32 * s + LINE_PX + PAD_PX + 2
    centre = 32 * s + (s - 1) / 2 - 0.5 + 1         # cx in the enlarged view (panels.scale_intrinsics), + frame
    for v in range(2):
        tile = sheet[-tile_h:, tile_w * v:tile_w * (v + 1)]   # below the legend, which shows the colour too
        cols = np.nonzero((tile == CLASS_COLOURS[0]).all(-1))[1]
        assert len(cols) > 10 and abs(cols.mean() - centre) < 1.0, (v, cols.mean(), centre)
