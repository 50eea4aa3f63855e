"""Test factories for the model and the trainer: a small train config over a test folder, and
a model whose zero-initialised tensors (adaLN tables, gates, final layer, ControlNet
projections) are given values, as after a stage of training, so every path is exercised."""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.contract import schema
from train.config import DataConfig, TrainConfig

# The small stage of the trainer tests: an image bucket and a 9-frame bucket on 3 views
STAGE_TWO_BUCKETS = """name: t
buckets:
  - {height: 32, width: 64, num_frames: 1, batch_size: 4}
  - {height: 32, width: 64, num_frames: 9, batch_size: 2}
"""
TEST_VIEWS = schema.VIEWS[:3]


def perturb_zero_init(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def train_config(root: Path, out: str, steps: int, **kw) -> TrainConfig:
    """A tiny-run TrainConfig over root/{shards, stage.yaml, text_cache}; keywords override.
    eps 1e-8, not the recipe's 1e-15: with 1e-15 Adam moves a weight whose gradient is rounding
    noise by a full +-lr, so runs that differ only in reduction order (DDP, FSDP, SP) would
    differ by ~lr instead of by float rounding."""
    d = dict(out=str(root / out), steps=steps, lr=2e-3, eps=1e-8, warmup=3, ema_decay=0.9, val_every=0,
             ckpt_every=1000,
             data=DataConfig(root=str(root / "shards"), stage=str(root / "stage.yaml"), samples_per_chunk=6,
                             shuffle_buffer=3, text_cache=str(root / "text_cache"), text_max_length=16))
    d.update(kw)
    return TrainConfig(**d)
