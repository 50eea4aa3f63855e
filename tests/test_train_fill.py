"""Repaired dropped frames in training: the loader passes the fill mask, the loss maps it to CogVAE's latent
groups (frame 0 alone, then 4 frames per latent) and leaves those view-frames out by default."""
from __future__ import annotations

import numpy as np
import torch

from pipeline.contract import schema
from tests.factories import make_sample
from train import flow
from train.batch import collate
from train.config import FlowConfig, TrainConfig
from train.data import decode


def _batch(filled_per_sample):
    samples = []
    for i, filled in enumerate(filled_per_sample):
        s = make_sample(num_frames=9, num_boxes=2, seed=i, filled=filled, start=20 * i)
        samples.append(decode(dict(schema.encode_sample(s), __key__=s["key"])))
    return collate(samples, 0, "64x128_t9")


def test_the_loader_passes_the_fill_mask():
    b = _batch([((5, 2),), ()])
    assert b.fill_mask.shape == (2, 9, 6) and b.fill_mask.dtype == torch.bool
    assert torch.nonzero(b.fill_mask).tolist() == [[0, 5, 2]]


def test_pixel_frames_map_to_their_latent_groups():
    mask = torch.zeros(1, 9, 2, dtype=torch.bool)                       # (B, T, V), T' = 3
    mask[0, 0, 0] = True                                                 # frame 0 -> latent 0 of view 0
    mask[0, 4, 1] = mask[0, 5, 1] = True                                 # frames 1-4 -> latent 1, 5-8 -> latent 2
    w = flow.fill_weights(mask, 3, 0.25)                                 # (B, V, T')
    assert w.tolist() == [[[0.25, 1.0, 1.0], [1.0, 0.25, 0.25]]]
    assert flow.fill_weights(mask, 3, 1.0) is None and flow.fill_weights(mask & False, 3, 0.0) is None
    one = torch.zeros(1, 17, 1, dtype=torch.bool)
    for frame, latent in ((1, 1), (4, 1), (8, 2), (9, 3), (16, 4)):   # the CogVAE grouping, frame by frame
        one[:] = False
        one[0, frame, 0] = True
        assert flow.fill_weights(one, 5, 0.0)[0, 0].tolist() == [float(k != latent) for k in range(5)], frame


def test_excluded_view_frames_do_not_reach_the_loss():
    torch.manual_seed(0)
    x0, noise = torch.randn(2, 6, 16, 3, 4, 4), torch.randn(2, 6, 16, 3, 4, 4)   # (B, V, C, T', H', W')
    pred = torch.randn_like(x0)
    b = _batch([((5, 2), (6, 2)), ()])
    w = flow.fill_weights(b.fill_mask, 3, FlowConfig().fill_weight)
    assert FlowConfig().fill_weight == 0.0 and w[0, 2].tolist() == [1.0, 1.0, 0.0] and bool((w[1] == 1).all())
    base = flow.flow_loss(pred, x0, noise, w)
    hit = pred.clone()
    hit[0, 2, :, 2] += 100.0                                             # only the excluded latent frame changes
    assert torch.equal(flow.flow_loss(hit, x0, noise, w), base)
    assert flow.flow_loss(hit, x0, noise) > base + 1.0                  # ... which the plain loss would have counted
    # the weighted mean of sample 0 is the mean of its kept elements; sample 1 is unweighted
    err = (pred - (noise - x0)) ** 2
    keep = torch.ones_like(err[0], dtype=torch.bool)
    keep[2, :, 2] = False
    assert torch.allclose(base, (err[0][keep].mean() + err[1].mean()) / 2)
    assert torch.allclose(flow.flow_loss(pred, x0, noise, torch.ones(2, 6, 3)), flow.flow_loss(pred, x0, noise))


def test_the_trainer_config_carries_the_choice():
    cfg = TrainConfig.from_dict({"flow": {"fill_weight": 0.5}})
    assert cfg.flow.fill_weight == 0.5 and TrainConfig().flow.fill_weight == 0.0
    assert np.isclose(flow.fill_weights(torch.ones(1, 1, 1, dtype=torch.bool), 1, 0.5).item(), 0.5)


def test_the_contact_sheet_marks_filled_views(tmp_path):
    from PIL import Image
    from train.video import FILLED_RGB, contact_sheet
    k = np.array([[40.0, 0, 32], [0, 40.0, 16], [0, 0, 1]], np.float32)
    path = contact_sheet(tmp_path / "s.png", np.zeros((2, 32, 64, 3), np.uint8), np.zeros((2, 0, 7), np.float32),
                         np.zeros(0, bool), np.zeros(0, np.int8), np.stack([k, k]), np.tile(np.eye(4), (2, 1, 1)),
                         ["A", "B"], filled=np.array([False, True]))
    img = np.asarray(Image.open(path))
    half = img.shape[1] // 2                        # two views side by side (each enlarged, labelled above)
    left, right = img[:, :half], img[:, half:]
    red = (right == FILLED_RGB).all(axis=-1)
    assert red.mean(1).max() > 0.9 and red.sum(0).max() > 150   # B's tile is framed in red (a full row, a column)
    assert not (left == FILLED_RGB).all(axis=-1).any()
