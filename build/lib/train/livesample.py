"""Clips sampled during training: every `sample_every` steps, from one fixed conditioning sample.

The conditions are chosen once, deterministically: the first sample (tar order) of the val split's
first bucket (or `sample_bucket`), else of the train split when there is no val split. The noise
is seeded with the run's seed, so step N and step 2N differ only by what the model learned. The
latents come from the sampler of mdv2-sample (train/sample.py: generate) with `sample_steps`
Euler steps and flow.cfg_scale, from the EMA weights by default (`sample_weights`), and are
written as mdv2-sample writes them (write_sample: <VIEW>.mp4, grid.mp4, contact_sheet.png,
latents.safetensors, sample.json) into OUT/samples/step-N/. With a VAE (`vae`, --vae) the clip is
decoded; without one, the mp4s and the sheet show the first three latent channels (8x upsampled:
a preview of the latent video, "decoded": false in sample.json).

Every rank runs the sampler's forwards (a sharded model needs all of them: FSDP2 gathers each
block's weights from every rank; an SP group splits the tokens), all with the same inputs; rank 0
alone decodes and writes.
"""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.contract import schema
from train.config import TrainConfig


def fixed_conditions(cfg: TrainConfig) -> tuple[dict, dict, str]:
    """(decoded sample, meta, split) of the conditioning sample of every training-time clip."""
    from train.sample import decode_members, pick_samples
    for split in (cfg.data.val_split, cfg.data.split):
        try:
            for _, key, members, url in pick_samples(cfg, split, cfg.sample_bucket, 0, 1):
                return (*decode_members(key, members, url), split)
        except FileNotFoundError:
            if split == cfg.data.split:
                raise
    raise AssertionError("unreachable")  # pick_samples raised OutOfRange


def latent_preview(latents: torch.Tensor) -> np.ndarray:
    """(V, 16, T', h, w) latents -> (V, T', 8h, 8w, 3) uint8: channels 0-2, each stretched to its range."""
    x = latents[:, :3].float()                                                    # (V, 3, T', h, w)
    lo = x.amin(dim=(0, 2, 3, 4), keepdim=True)
    hi = x.amax(dim=(0, 2, 3, 4), keepdim=True)
    x = ((x - lo) / (hi - lo).clamp_min(1e-6) * 255).round().to(torch.uint8)
    x = x.permute(0, 2, 3, 4, 1).numpy()                                          # (V, T', h, w, 3)
    k = schema.VAE_SPATIAL_COMPRESSION
    return np.ascontiguousarray(x.repeat(k, axis=2).repeat(k, axis=3))


class LiveSampler:
    """The clips of one run. Build it on every rank; call it on every rank at the same steps."""

    def __init__(self, cfg: TrainConfig, out: Path, rank: int):
        self.cfg, self.out, self.rank = cfg, Path(out), rank
        self.sample, self.meta, self.split = fixed_conditions(copy.deepcopy(cfg))
        self.vae = None

    def due(self, step: int) -> bool:
        """After optimizer step `step` (1-based)?"""
        return self.cfg.sample_every > 0 and step % self.cfg.sample_every == 0

    @torch.no_grad()
    def __call__(self, model, ema, text, device: torch.device, autocast: bool, step: int) -> dict | None:
        """Sample after step `step` -> (rank 0) {"dir", "frames" (V, T, H, W, 3) uint8, "sheet", "fps", "info"}."""
        from train.sample import generate, write_sample
        cfg, t0 = self.cfg, time.perf_counter()
        backup = _swap_in(model, ema) if cfg.sample_weights == "ema" else None
        was = model.training
        model.eval()
        try:
            lat = generate(model, text, cfg, self.sample, cfg.seed, cfg.sample_steps, cfg.flow.cfg_scale, device,
                           autocast)                                              # (V, 16, T', h, w)
        finally:
            model.train(was)
            if backup is not None:
                _restore(model, backup)
        if self.rank != 0:
            return None
        if cfg.vae:
            from train.vaedecode import decode_latents, load_decoder
            if self.vae is None:
                self.vae = load_decoder(cfg.vae, device)
            frames = decode_latents(self.vae, lat, float(self.meta["vae"]["scaling_factor"]))   # (V, T, H, W, 3)
        else:
            frames = latent_preview(lat)
        folder = self.out / "samples" / f"step-{step:07d}"
        info = {"key": self.sample["key"], "split": self.split, "caption": self.sample["caption"], "step": step,
                "steps": cfg.sample_steps, "cfg_scale": cfg.flow.cfg_scale, "weights": cfg.sample_weights,
                "seed": cfg.seed, "decoded": bool(cfg.vae), "vae": cfg.vae}
        info = write_sample(folder, frames, lat, self.sample, self.meta, info)
        info["sample_s"] = time.perf_counter() - t0
        fps = int(self.meta["fps"]) if cfg.vae else max(1, int(self.meta["fps"]) // schema.VAE_TEMPORAL_COMPRESSION)
        print(f"train: step {step}: sample in {folder} ({info['sample_s']:.1f} s)", file=sys.stderr)
        return {"dir": folder, "frames": frames, "sheet": folder / "contact_sheet.png", "fps": fps, "info": info}


def _swap_in(model, ema) -> dict[str, torch.Tensor]:
    """Put the EMA weights into the model's parameters (shard by shard under FSDP) -> the weights they replaced."""
    params = dict(model.named_parameters())
    backup = {k: p.detach().clone() for k, p in params.items()}
    for k, p in params.items():
        p.detach().copy_(ema.shadow[k])
    return backup


def _restore(model, backup: dict[str, torch.Tensor]) -> None:
    for k, p in model.named_parameters():
        p.detach().copy_(backup[k])
