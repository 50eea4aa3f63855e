"""A tiny random-weight CogVideoX VAE in the real diffusers format (tests and the demo).

``python -m pipeline.shards.vae --out DIR`` (console script ``mdv2-tiny-vae``) writes a folder that
``AutoencoderKLCogVideoX.from_pretrained(DIR, local_files_only=True)`` loads, exactly like
the ``vae/`` folder of CogVideoX-2b/-5b. Its weights are random: the latents it produces are
MEANINGLESS (right shapes and dtypes, no image content); use it to exercise the pipeline,
never to train. For real latents point ``--vae`` at the ``vae/`` sub-folder of a locally
downloaded CogVideoX-2b or CogVideoX-5b checkpoint (DESIGN.md §8).
"""
from __future__ import annotations

import os
import sys

from pipeline.contract import cli

# DESIGN.md §8: same architecture family as the real VAE, 8 channels per block instead of 128-512.
TINY_VAE_CONFIG = dict(block_out_channels=(8, 8, 8, 8), latent_channels=16, layers_per_block=1,
                       norm_num_groups=2, temporal_compression_ratio=4)
TINY_VAE_NOTE = ("random weights: its latents are meaningless (correct shapes only). For real latents pass "
                 "--vae <CogVideoX-2b or -5b checkpoint>/vae (a local folder; nothing is downloaded).")


def write_tiny_vae(folder: str | os.PathLike, seed: int = 0) -> str:
    """Save a tiny AutoencoderKLCogVideoX with seeded random weights to ``folder``; returns the folder."""
    import torch
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(seed)  # same seed -> same weights -> byte-identical shards across machines
    vae = AutoencoderKLCogVideoX(**TINY_VAE_CONFIG)
    vae.save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


@cli.entry
def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(
        prog="mdv2-tiny-vae",
        description="Write a tiny random-weight CogVideoX VAE (diffusers AutoencoderKLCogVideoX, save_pretrained "
                    "format) for tests and the demo. " + TINY_VAE_NOTE)
    p.add_argument("--out", required=True, help="folder to write (config.json + diffusion_pytorch_model.safetensors)")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    a = p.parse_args(argv)
    if os.path.isfile(a.out):
        raise cli.BadInput(f"--out {a.out} is a file; pass a folder to write the VAE into")
    folder = write_tiny_vae(a.out, a.seed)
    print(f"tiny CogVAE written to {folder}\nNOTE: {TINY_VAE_NOTE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
