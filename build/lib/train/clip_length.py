"""Changing a decoded sample's length: the common prefix of a mixed-length batch, and the
sampler's crop or extension to a length no bucket had.

The model takes any T = 4k+1 pixel frames (T' = (T-1)//4 + 1 latents). Two places need a
sample at another length than it was built with:

- the trainer's "full" bucket mixes clip lengths, and a batch needs one T: every sample is
  cropped to a common prefix (`common_prefix`);
- the sampler may generate a length the conditioning sample does not have (`fit_frames`).

Cropping is exact for the conditions (per-frame arrays, and the model's condition encoders
are causal, so a prefix's tokens are the prefix of the tokens). For the latents it is exact
only where CogVAE's encoder started a new frame batch: diffusers' AutoencoderKLCogVideoX
encodes frames in batches of 8 with the first batch holding the T % 8 extra frames
(frames [0, 8 + T%8), then 8 at a time), and its GroupNorms see a whole batch, so the first
latents of a T-frame clip equal the latents of its first c frames only when c = T or
c = 8j + T % 8 (j >= 1). For the pipeline's buckets (1 or 8k+1) every 8k+1 prefix is exact.

Extension ("hold"): frames after the sample's last one repeat it: the ego stops (trajectory
holds its last pose), every object holds its last box in every view, the BEV map, the
extrinsics and visibility stay as they were; the latents (used by the sampler for their shape
only) repeat the last latent frame. A documented, physically consistent scene, not a forecast.
"""
from __future__ import annotations

import logging

import numpy as np

from pipeline.contract import schema

log = logging.getLogger("train.clip_length")

VAE_FRAME_BATCH = 8  # AutoencoderKLCogVideoX.num_sample_frames_batch_size (diffusers' _encode)
PER_FRAME = ("boxes", "view_boxes", "box_mask", "box_view_mask", "traj", "bev", "cam2lidar", "fill_mask")  # axis 0 = T
OPTIONAL_PER_FRAME: tuple[str, ...] = ()  # axis 0 = T, members a decoded sample may lack
PER_LATENT = ("latent_mean", "latent_std")                                                   # axis 2 = T'


def vae_prefix_exact(t_full: int, t: int) -> bool:
    """Are the first latent_frames(t) latents of a t_full-frame clip the latents of its first t frames?"""
    r = t_full % VAE_FRAME_BATCH
    return t == t_full or (t_full > t >= VAE_FRAME_BATCH + r and (t - r) % VAE_FRAME_BATCH == 0)


def common_prefix(lengths: list[int]) -> tuple[int, bool]:
    """The frame count a mixed-length batch is cropped to, and whether its latents are exact: the
    longest 4k+1 prefix <= the shortest clip that is exact for every clip; when none is, the
    shortest clip's length (its latents are then approximate for the longer clips)."""
    t_min = min(lengths)
    for t in range(t_min, 0, -schema.VAE_TEMPORAL_COMPRESSION):
        if all(vae_prefix_exact(n, t) for n in lengths):
            return t, True
    return t_min, False


def crop_frames(sample: dict, t: int) -> dict:
    """The first t frames of a decoded sample (train.data.decode's dict)."""
    tl = schema.latent_frames(t)
    out = dict(sample, shape=(*sample["shape"][:2], t))
    for name in PER_FRAME + OPTIONAL_PER_FRAME:
        if name in PER_FRAME or sample.get(name) is not None:
            out[name] = sample[name][:t]
    for name in PER_LATENT:
        if sample.get(name) is not None:
            out[name] = sample[name][:, :, :tl]
    return out


def hold_frames(sample: dict, t: int) -> dict:
    """Extend a decoded sample to t frames by repeating its last frame (see the module doc)."""
    t0 = sample["shape"][2]
    extra, extra_l = t - t0, schema.latent_frames(t) - schema.latent_frames(t0)
    out = dict(sample, shape=(*sample["shape"][:2], t))
    for name in PER_FRAME + OPTIONAL_PER_FRAME:
        a = sample[name] if name in PER_FRAME else sample.get(name)
        if a is not None:
            out[name] = np.concatenate([a, np.repeat(a[-1:], extra, axis=0)])
    for name in PER_LATENT:
        a = sample.get(name)
        if a is not None:
            out[name] = np.concatenate([a, np.repeat(a[:, :, -1:], extra_l, axis=2)], axis=2)
    return out


def fit_frames(sample: dict, t: int) -> dict:
    """A decoded sample at exactly t = 4k+1 frames: cropped if longer, held (extended) if shorter."""
    if not schema.valid_num_frames(t):
        raise ValueError(f"{t} frames: the model generates any 4k+1 frames (1, 5, 9, 13, ...)")
    t0 = sample["shape"][2]
    if t < t0:
        return crop_frames(sample, t)
    return hold_frames(sample, t) if t > t0 else sample
