"""One batch's training loss and the random draws behind it (timesteps, noise, latents, drops).

Every draw of a sample comes from its own generator, seeded by (seed, step, rank, i) where i is
the sample's place among the rank's samples of that optimizer step (`StepRNG`). So a step is
the same whether its samples arrive as one batch or as `grad_accum` micro-batches (micro-batch k
of size b holds samples k*b .. k*b+b-1): accumulation changes the batching, not the draws.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from train import flow
from train.batch import Batch
from train.config import FlowConfig, TrainConfig


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """A generator of a (step, rank), for draws that are not per sample (tests, benches)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 1_009 + rank * 7_919) % (2 ** 63))


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed torch's global RNG per (step, rank), for any randomness inside the model (dropout)."""
    torch.manual_seed((seed * 1_000_003 + step * 1_009 + rank) % (2 ** 63))


@dataclass(frozen=True)
class StepRNG:
    """The draws of one (step, rank): sample i (counted from `first`) gets its own generator."""
    seed: int
    step: int
    rank: int
    first: int = 0

    def generators(self, count: int) -> list[torch.Generator]:
        # a hash, not a linear mix: (step, i) pairs never collide
        return [torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(
            f"{self.seed},{self.step},{self.rank},{self.first + i}".encode(), digest_size=8).digest(), "little") >> 1)
            for i in range(count)]

    def after(self, count: int) -> "StepRNG":
        """The RNG of the next micro-batch of this step, after `count` samples."""
        return StepRNG(self.seed, self.step, self.rank, self.first + count)


def step_rng(seed: int, step: int, rank: int) -> StepRNG:
    return StepRNG(seed, step, rank)


def condition_drops(batch: int, frames: int, cfg: FlowConfig, gen: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The CFG drops of one batch, as the authors train (scripts/train_magicdrive.py):
    -> drop_cond (B,) bool: text, camera, boxes and trajectory all replaced by their nulls,
       for a `cfg.drop_all` share of the samples (the map is never dropped);
       drop_frames (B, T) bool over pixel frames: boxes and trajectory of that frame masked.
    A sample with everything dropped has every frame masked too; each other sample masks
    int(drop_frames_ratio * (T - 2)) interior frames drawn without replacement (never the first
    or the last frame: the authors' `random.sample(range(1, T - 1), int(0.4 * (T - 2)))`)."""
    drop_cond = torch.rand(batch, generator=gen) < cfg.drop_all
    drop_frames = drop_cond[:, None].repeat(1, frames)
    k = int(cfg.drop_frames_ratio * (frames - 2)) if frames > 2 else 0
    for i in range(batch):
        if k and not drop_cond[i]:
            drop_frames[i, 1 + torch.randperm(frames - 2, generator=gen)[:k]] = True
    return drop_cond, drop_frames


def compute_loss(model, batch: Batch, text, cfg: TrainConfig, rng: StepRNG, device: torch.device,
                 autocast: bool, drops: bool = True, stats: dict | None = None) -> torch.Tensor:
    """The rectified-flow v-prediction loss of one batch (mean over its samples); sample i's draws
    come from rng.generators(B)[i]. ``drops`` False: no condition dropped (validation). ``stats``
    gets the drop counts."""
    b = len(batch.keys)
    gens = rng.generators(b)
    x0 = batch.sample_latents(gens)                                       # (B, V, 16, T', H', W')
    _, _, _, tl, h, w = x0.shape
    emb, mask = text.embed(batch.captions)
    cond = batch.conditions(emb, mask, device)
    shift = flow.shift_factor(cfg.flow, h * 8, w * 8, tl)
    t = torch.cat([flow.sample_timesteps(1, cfg.flow, shift, g) for g in gens])        # (B,)
    noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens])       # (B, V, 16, T', H', W')
    dcfg = cfg.flow if drops else FlowConfig(drop_all=0.0, drop_frames_ratio=0.0)
    per = [condition_drops(1, cond.num_frames, dcfg, g) for g in gens]
    drop_cond, drop_frames = torch.cat([p[0] for p in per]), torch.cat([p[1] for p in per])   # (B,), (B, T)
    cond = _box_latents(model, cond, gens)
    if stats is not None:
        stats.update(drop_all=int(drop_cond.sum()), drop_frames=int(drop_frames[~drop_cond].sum()), batch=b)
    x0, noise, t = x0.to(device), noise.to(device), t.to(device)
    xt = flow.interpolate(x0, noise, t)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        pred = model(xt, t, cond, drop_cond=drop_cond.to(device), drop_frames=drop_frames.to(device))
    weight = flow.fill_weights(batch.fill_mask, tl, cfg.flow.fill_weight)   # (B, V, T') or None: repaired drops
    return flow.flow_loss(pred, x0, noise, weight)


def _box_latents(model, cond, gens: list[torch.Generator]):
    """The per-box latent of each sample from its own generator (else the model would draw the whole
    batch from the global RNG, and a micro-batch would see other values than the full batch)."""
    inner = getattr(model, "module", model)          # a DDP wrapper holds the model as .module
    emb = getattr(inner, "bbox_embedder", None)
    if emb is None or getattr(emb, "mean_var", None) is None:
        return cond
    n = cond.box_class.shape[1]
    lat = torch.cat([torch.randn(1, n, emb.latent_dim, generator=g) for g in gens])   # (B, N, D)
    return cond.replace(box_latent=lat.to(cond.text.device))
