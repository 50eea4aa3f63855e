"""Rectified flow: interpolation, v-prediction loss, timestep sampling, Euler sampler with CFG.

Convention (SD3, Esser et al. 2024): t in [0, 1], t = 0 is data and t = 1 is noise,

    x_t = (1 - t) * x0 + t * eps,        v = dx_t/dt = eps - x0,

and the model predicts v from (x_t, t). Open-Sora 1.2 writes the same flow with the time
axis reversed and t scaled to [0, 1000]; the model here takes t in [0, 1] as is.
Training draws t from a logit-normal (SD3 §3.1: more weight on the middle of the path),
then shifts it toward noise for inputs with more latent pixels x frames (Open-Sora 1.2
``timestep_transform``): bigger inputs keep more signal at a given t, so they need more
noise to be equally hard. Sampling integrates from t = 1 to 0 with Euler steps on the
same shifted grid.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from train.config import FlowConfig


def shift_factor(cfg: FlowConfig, height: int, width: int, latent_frames: int) -> float:
    """sqrt(pixels / base) * sqrt(latent frames): 1 for a 512x512 image (the authors' base), 0.58 for a
    224x400 image, larger for bigger/longer inputs."""
    if not cfg.shift:
        return 1.0
    return math.sqrt(height * width / cfg.shift_base_pixels) * math.sqrt(latent_frames) * cfg.shift_scale


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t' = s t / (1 + (s - 1) t): monotone, fixes 0 and 1, pushes toward 1 (noise) for s > 1."""
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(batch: int, cfg: FlowConfig, shift: float, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """(B,) logit-normal timesteps, shifted."""
    n = torch.randn(batch, generator=generator) * cfg.logit_std + cfg.logit_mean
    return shift_time(torch.sigmoid(n), shift).to(device)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps; t (B,) broadcast over the remaining axes."""
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def flow_loss(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of the velocity, averaged per sample then over the batch -> scalar. ``weight`` (B, V, T')
    weighs each view's latent frames (``fill_weights``): a weighted mean per sample, so a sample's loss keeps its
    scale whatever share of it is down-weighted (a sample weighted 0 everywhere adds 0)."""
    err = (pred.float() - velocity_target(x0, noise).float()) ** 2     # (B, V, C, T', H', W')
    if weight is None:
        return err.flatten(1).mean(1).mean()
    w = weight.to(err.device, err.dtype)[:, :, None, :, None, None].expand_as(err)
    return ((err * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1e-12)).mean()


def fill_weights(fill_mask: torch.Tensor, latent_frames: int, fill_weight: float) -> torch.Tensor | None:
    """(B, T, V) bool pixel-frame fill mask -> (B, V, T') loss weights: ``fill_weight`` for a view's latent frame
    whose CogVAE group holds a repaired frame of that view (frame 0 alone is latent 0, then frames 4k-3..4k are
    latent k), 1 elsewhere; None when nothing is down-weighted (the plain mean)."""
    if fill_weight == 1.0 or not bool(fill_mask.any()):
        return None
    b, t, v = fill_mask.shape
    group = torch.tensor([0] + [(i - 1) // 4 + 1 for i in range(1, t)], dtype=torch.long)   # (T,) latent of frame
    hit = torch.zeros(b, latent_frames, v).index_add_(1, group, fill_mask.float()) > 0        # (B, T', V)
    return torch.where(hit, float(fill_weight), 1.0).permute(0, 2, 1)                        # (B, V, T')


def sample_grid(steps: int, shift: float) -> torch.Tensor:
    """steps + 1 times from 1 to 0 on the shifted grid."""
    return shift_time(torch.linspace(1.0, 0.0, steps + 1), shift)


VelocityFn = Callable[[torch.Tensor, torch.Tensor, dict | None], torch.Tensor]


@torch.no_grad()
def euler_sample(velocity: VelocityFn, noise: torch.Tensor, steps: int = 30, shift: float = 1.0,
                 cfg_scale: float = 1.0, null_drop: dict[str, bool] | None = None,
                 progress: Callable | None = None) -> torch.Tensor:
    """Integrate dx/dt = v from t = 1 (noise) to t = 0 (data).

    velocity(x, t, drop) -> v; ``drop`` maps condition names to (B,) bool (None = keep all).
    With cfg_scale != 1 each step also evaluates the unconditional branch (the conditions
    in ``null_drop`` replaced by their nulls) in the same batch and combines
    v = v_uncond + scale * (v_cond - v_uncond)."""
    x = noise
    b = x.shape[0]
    grid = sample_grid(steps, shift).to(x.device)
    use_cfg = cfg_scale != 1.0 and null_drop
    it = range(steps) if progress is None else progress(range(steps))
    for i in it:
        t, t_next = grid[i], grid[i + 1]
        tb = t.expand(b)
        if use_cfg:
            drop = {k: torch.cat([torch.zeros(b, dtype=torch.bool), torch.full((b,), bool(v))]).to(x.device)
                    for k, v in null_drop.items()}
            v_both = velocity(torch.cat([x, x]), torch.cat([tb, tb]), drop)
            v_cond, v_unc = v_both.chunk(2)
            v = v_unc + cfg_scale * (v_cond - v_unc)
        else:
            v = velocity(x, tb, None)
        x = x + (t_next - t) * v.to(x.dtype)  # t decreases: step along -v
    return x
