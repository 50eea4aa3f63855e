"""CogVAE decoding for the sampler: latents -> uint8 frames, tiled so a 848x1600 clip fits a GPU.

Memory (why tiling). diffusers' AutoencoderKLCogVideoX decodes 2 latent frames at a time (8 pixel
frames; 3 latents, 9 frames, in the first batch, the largest) with a causal conv cache, and its
largest activations are the 128-channel maps of the last up-block at the full output size, so
they grow with the decoded area: the authors' FAQ measures 51-58 GB for one 848x1600 view
decoded whole. `enable_tiling` decodes overlapping spatial tiles one after another and blends
them, so the activations are those of ONE tile: the default 240x360 px tile (30x45 latents,
overlap 1/5 -> stride 192x288 px) is 86,400 px instead of 1,356,800 (1/15.7), about 3.4-4.7 GB
in bf16, plus the decoded tiles kept for blending (0.26 GB at T = 17) and the VAE's 0.43 GB of
bf16 weights: well under 40 GB (docs/train.md shows how these figures were made on a CPU;
bench/gpu.py (c) measures them where a GPU is lent). `enable_slicing` decodes the items of a
batch one by one (we decode one view at a time anyway).

Tile stride: diffusers steps through the latent by int(tile_latent * (1 - overlap)) and crops each
blended tile to tile_px - int(tile_px * overlap) pixels; the two agree only when that pixel stride
is a multiple of 8 (the spatial compression), else the output has seams or a wrong size
(DESIGN.md §8). `DecodeConfig.check` refuses a tile that breaks it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.contract import cli, schema
from train.video import to_uint8


@dataclass
class DecodeConfig:
    tiling: bool = True
    tile_height: int = 240         # pixels; the latent tile is tile / 8
    tile_width: int = 360
    tile_overlap: float = 1 / 5    # of the tile, blended between neighbours

    def check(self) -> None:
        for name, size in (("height", self.tile_height), ("width", self.tile_width)):
            latent = size // schema.VAE_SPATIAL_COMPRESSION
            stride_px = size - int(size * self.tile_overlap)
            if size % schema.VAE_SPATIAL_COMPRESSION or int(latent * (1 - self.tile_overlap)) * 8 != stride_px:
                raise cli.BadInput(
                    f"decode tile {name} {size} px with overlap {self.tile_overlap:g}: the tile must be a multiple "
                    f"of 8 px and its stride ({stride_px} px) a multiple of 8 that diffusers' latent stride "
                    f"matches; e.g. 240x360 with overlap 0.2")


def setup_decoder(vae, cfg: DecodeConfig | None = None):
    """Tiling and slicing on a loaded AutoencoderKLCogVideoX as `cfg` says; returns it."""
    cfg = cfg or DecodeConfig()
    cfg.check()
    if cfg.tiling:
        vae.enable_tiling(tile_sample_min_height=cfg.tile_height, tile_sample_min_width=cfg.tile_width,
                          tile_overlap_factor_height=cfg.tile_overlap, tile_overlap_factor_width=cfg.tile_overlap)
    vae.enable_slicing()
    return vae


def load_decoder(folder: str, device: torch.device | str, cfg: DecodeConfig | None = None):
    """The CogVAE of `folder` (local diffusers folder) on `device`: bf16 on a GPU (fp16 gives NaNs,
    DESIGN.md §8), fp32 on the CPU; tiling and slicing as `cfg` says."""
    from diffusers import AutoencoderKLCogVideoX
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vae = AutoencoderKLCogVideoX.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
    return setup_decoder(vae.to(device, dtype).eval().requires_grad_(False), cfg)


@torch.no_grad()
def decode_view(vae, latent: torch.Tensor, scaling_factor: float) -> np.ndarray:
    """(16, T', h, w) scaled latents of one view -> (T, H, W, 3) uint8, T = 4(T'-1) + 1.

    diffusers' decoder treats a batch's first latent as the clip's single first frame only when the
    batch is odd, so an even T' (T = 5, 13, ...: the 4k+1 lengths that are not 8k+1) would come out as
    4T' frames with frame 0 stretched. Such latents get a copy of their last latent appended (T' odd,
    every real latent keeps its place) and the clip is cut back to T; the pad only touches the last
    4 frames' norms."""
    tl = latent.shape[1]
    t = schema.VAE_TEMPORAL_COMPRESSION * (tl - 1) + 1
    if tl % 2 == 0:
        latent = torch.cat([latent, latent[:, -1:]], 1)                                   # (16, T'+1, h, w)
    z = latent[None].to(vae.device, vae.dtype) / scaling_factor
    video = vae.decode(z).sample                                                         # (1, 3, T, H, W)
    return to_uint8(video[0, :, :t].permute(1, 0, 2, 3).float().cpu().numpy())           # (T, H, W, 3)


def decode_latents(vae, latents: torch.Tensor, scaling_factor: float, device="cpu",
                   cfg: DecodeConfig | None = None) -> np.ndarray:
    """(V, 16, T', h, w) scaled latents -> (V, T, H, W, 3) uint8, one view at a time (memory).
    `vae` is a loaded decoder or a CogVAE folder."""
    if isinstance(vae, str) or hasattr(vae, "__fspath__"):
        vae = load_decoder(str(vae), device, cfg)
    return np.stack([decode_view(vae, latents[v], scaling_factor) for v in range(latents.shape[0])])
