"""CogVideoX VAE encoder: uint8 frames -> posterior mean/std latents (float16), on GPU or CPU.

The VAE is ``diffusers.AutoencoderKLCogVideoX`` loaded from a local folder (the ``vae/``
folder of CogVideoX-2b/-5b, or ``python -m pipeline.shards.vae`` for a tiny random one); the
scaling factor is read from its config and stored in meta.json, never hard-coded.

Precision: bf16 on GPU (fp16 overflows to NaN in this VAE), fp32 on CPU.

Latent reuse across lengths (measured on the tiny model, tests/test_encode_vae.py): diffusers
encodes the first 9 frames as one chunk, then 8 frames per chunk with a causal conv cache, so
the latents of a T-frame clip (T >= 9) starting at s are *bit-identical* to the first
(T-1)/4+1 latents of any longer clip starting at s. T = 1 is different: GroupNorm in the
encoder normalises over time inside a chunk, so a lone frame is not the first frame of a
9-frame chunk (max |diff| ~0.2 on the tiny model). The build therefore encodes each
(scene, start, resolution) once at its longest T >= 9 and cuts shorter buckets from it,
and encodes T = 1 clips on their own. Spatial tiling keeps this property (same chunking per tile).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.contract import cli, schema


@dataclass
class EncodeConfig:
    vae: str                                 # local diffusers folder of AutoencoderKLCogVideoX
    device: str = "auto"                     # auto | cpu | cuda
    views_per_batch: int = 0                 # views encoded together (0 = all); 1 = one view at a time (memory)
    tiling: bool = False                     # spatial tiling for 848x1600-class inputs
    tile_height: int = 240                   # tile size in pixels (tile stride must be a multiple of 8)
    tile_width: int = 360
    tile_overlap: float = 1 / 5
    frame_batch: int = 8                     # frames per causal chunk after the first (diffusers default 8)
    store_std: bool = True                   # write latent_std.npy too (meta latent="mean+std")
    torch_threads: int = 1                   # CPU threads per actor
    # Fault-injection hook for tests and drills, not a mock: the input frames of the encode unit that
    # produces these clip keys are set to NaN before the REAL encoder runs, so its output is non-finite
    # and the quarantine path is exercised end to end. Empty in production.
    inject_nan_keys: tuple[str, ...] = ()

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"


def vae_meta(vae_dir: str) -> dict[str, Any]:
    """meta.json 'vae' block from the folder's config.json (no torch import needed)."""
    import json
    import os
    cfg_path = os.path.join(vae_dir, "config.json")
    if not os.path.exists(cfg_path):
        raise cli.InputNotFound(f"--vae {vae_dir!r} has no config.json: pass the vae/ folder of a CogVideoX "
                                f"checkpoint or create a tiny one with `python -m pipeline.shards.vae --out DIR`")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if cfg.get("_class_name") != "AutoencoderKLCogVideoX":
        raise cli.BadInput(f"{cfg_path}: _class_name is {cfg.get('_class_name')!r}, expected AutoencoderKLCogVideoX")
    name = os.path.basename(os.path.normpath(vae_dir))
    parent = os.path.basename(os.path.dirname(os.path.normpath(vae_dir)))
    return {"name": f"{parent}/{name}" if name == "vae" and parent else name,
            "scaling_factor": float(cfg["scaling_factor"]),
            "temporal_compression": int(cfg.get("temporal_compression_ratio", schema.VAE_TEMPORAL_COMPRESSION)),
            "spatial_compression": 2 ** (len(cfg["block_out_channels"]) - 1)}


def load_vae(cfg: EncodeConfig):
    import torch
    from diffusers import AutoencoderKLCogVideoX

    device = cfg.resolved_device()
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    # low_cpu_mem_usage=False: the same load path with or without `accelerate` installed (no warning)
    vae = AutoencoderKLCogVideoX.from_pretrained(cfg.vae, local_files_only=True, torch_dtype=dtype,
                                                 low_cpu_mem_usage=False)
    vae = vae.to(device).eval().requires_grad_(False)
    vae.num_sample_frames_batch_size = cfg.frame_batch
    if cfg.tiling:
        if int(cfg.tile_height * (1 - cfg.tile_overlap)) % 8 or int(cfg.tile_width * (1 - cfg.tile_overlap)) % 8:
            raise ValueError("tile stride (tile size x (1 - overlap)) must be a multiple of 8 pixels "
                             f"(got {cfg.tile_height}x{cfg.tile_width}, overlap {cfg.tile_overlap})")
        vae.enable_tiling(tile_sample_min_height=cfg.tile_height, tile_sample_min_width=cfg.tile_width,
                          tile_overlap_factor_height=cfg.tile_overlap, tile_overlap_factor_width=cfg.tile_overlap)
    vae.enable_slicing()  # batch items one at a time inside encode(): peak memory of one view
    return vae, device, dtype


def non_finite(a: np.ndarray) -> int:
    return int(a.size - np.count_nonzero(np.isfinite(a)))


class VaeEncoder:
    """Holds one loaded VAE; encodes (V, T, H, W, 3) uint8 clips to (V, 16, T', H/8, W/8) float16."""

    def __init__(self, cfg: EncodeConfig):
        import torch
        torch.set_num_threads(max(1, cfg.torch_threads))
        self.cfg = cfg
        self.vae, self.device, self.dtype = load_vae(cfg)
        self.meta = vae_meta(cfg.vae)

    def encode(self, frames: np.ndarray, inject_nan: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """frames (V, T, H, W, 3) uint8 -> (mean, std), each (V, 16, T', H/8, W/8) float16.

        Values are returned as they come (NaN/Inf included, also float16 overflow): the caller checks
        each clip cut from them, so one bad clip does not condemn the others (see write_shard_task)."""
        import torch
        v, t = frames.shape[:2]
        if not schema.valid_bucket_frames(t):
            raise ValueError(f"T={t} frames: CogVAE needs 1 or 8k+1")
        step = self.cfg.views_per_batch or v
        means, stds = [], []
        with torch.inference_mode():
            for i in range(0, v, step):
                x = torch.from_numpy(np.ascontiguousarray(frames[i:i + step])).to(self.device)  # (v, T, H, W, 3)
                x = (x.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0).to(self.dtype)          # (v, 3, T, H, W)
                if inject_nan:
                    x = torch.full_like(x, float("nan"))
                dist = self.vae.encode(x).latent_dist
                means.append(dist.mean.float().cpu().numpy())  # (v, 16, T', H/8, W/8)
                stds.append(dist.std.float().cpu().numpy())
        with np.errstate(over="ignore"):
            return np.concatenate(means).astype(np.float16), np.concatenate(stds).astype(np.float16)


@dataclass
class EncodeUnit:
    """One encoder call's worth of work: a (scene, start, resolution) clip of T frames, all views.

    Shorter clips with the same start (T >= 9) are cut from its latents (see the module doc)."""
    uid: str                                  # the key of the longest clip it serves
    frames: list[list[str]]                   # T x V source paths (relative to the dataroot)
    keys: list[str] = field(default_factory=list)  # clip keys cut from it
    inject_nan: bool = False                  # fault drill (EncodeConfig.inject_nan_keys), set by the driver


def encode_units(encoder: VaeEncoder, frameset, units: list[EncodeUnit],
                 views: tuple[int, int] | None = None) -> dict[str, dict]:
    """Encode units (views [v0, v1) of each, or all) against one decoded FrameSet (pipeline.shards.windows).

    Returns {uid: {"mean", "std", "bad_frames": {path: reason}, "views": (v0, v1)}}. Bad frames
    (missing/corrupt) are zero-filled and still encoded: the causal encoder keeps the clean prefix clips
    exact, and the writer quarantines exactly the clips whose own frames include a bad one."""
    import time
    index = frameset.index()
    out: dict[str, dict] = {}
    for u in units:
        t0 = time.perf_counter()
        v0, v1 = views or (0, len(u.frames[0]))
        own = [row[v0:v1] for row in u.frames]                              # T x (v1 - v0) paths
        bad = {p: frameset.errors[p] for row in own for p in row if p in frameset.errors}
        rows = np.array([[index[p] for p in row] for row in own])           # (T, v)
        clip = frameset.pixels[rows.T]                                      # (v, T, H, W, 3) uint8
        inject = u.inject_nan or bool(set(u.keys) & set(encoder.cfg.inject_nan_keys))
        mean, std = encoder.encode(clip, inject_nan=inject)
        out[u.uid] = {"mean": mean, "std": std, "bad_frames": bad, "seconds": time.perf_counter() - t0,
                      "frames": int(rows.size), "views": (v0, v1)}
    return out


def reuse_holds(frame_batch: int) -> bool:
    """diffusers chunks a T-frame clip as [frame_batch + T % frame_batch, frame_batch, ...]; for T = 8k+1
    every prefix shares the chunk boundaries of the longer clip exactly when frame_batch divides 8."""
    return frame_batch >= 1 and 8 % frame_batch == 0


def plan_units(clips: list, frames_of: dict[str, list], reuse: bool = True) -> tuple[dict, dict]:
    """Encode units per (scene, H, W): T >= 9 clips sharing a start share one unit (the longest) when
    ``reuse``; T = 1 clips are always their own unit (see the module doc on latent reuse). Returns
    ({(scene, H, W): [EncodeUnit]}, {key: uid})."""
    groups: dict[tuple, dict[int, list]] = defaultdict(lambda: defaultdict(list))
    for c in clips:  # pipeline.shards.write.ClipRef
        groups[(c.scene_name, c.height, c.width)][c.start].append(c)
    units: dict[tuple, list[EncodeUnit]] = {}
    unit_of: dict[str, str] = {}
    for g, by_start in sorted(groups.items()):
        us = []
        for start, cs in sorted(by_start.items()):
            singles = [c for c in cs if c.num_frames == 1]
            videos = sorted((c for c in cs if c.num_frames > 1), key=lambda c: (-c.num_frames, c.key))
            for c in singles:
                us.append(EncodeUnit(c.key, frames_of[c.key], [c.key]))
            if videos and reuse:
                us.append(EncodeUnit(videos[0].key, frames_of[videos[0].key], [c.key for c in videos]))
            elif videos:
                us.extend(EncodeUnit(c.key, frames_of[c.key], [c.key]) for c in videos)
        for u in us:
            for k in u.keys:
                unit_of[k] = u.uid
        units[g] = us
    return units, unit_of


class EncodeActor:
    """Ray actor: the VAE is loaded once in __init__; __call__ encodes a batch.

    batch = {"frames": FrameSet, "units": [EncodeUnit, ...], "views": (v0, v1) | None}
    -> {uid: {"mean", "std", "bad_frames", "views"}}.
    build.py wraps it with ray.remote(num_gpus=1) when the cluster has GPUs, else num_cpus=…"""

    def __init__(self, cfg: EncodeConfig):
        self.encoder = VaeEncoder(cfg)

    def __call__(self, batch: dict) -> dict[str, dict]:
        return encode_units(self.encoder, batch["frames"], batch["units"], batch.get("views"))

    def run(self, frames, units: list[EncodeUnit], views: tuple[int, int] | None = None) -> dict[str, dict]:
        """Same as __call__ with the FrameSet as a top-level argument, so Ray resolves its ObjectRef."""
        return self({"frames": frames, "units": units, "views": views})
