"""Named MVDiT presets, `build_model`, parameter counts, and `mdv2-describe`.

    python -m model.registry --describe          # parameter counts of every preset
    python -m model.registry --describe --preset small --json
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace

import torch
from torch import nn

from model.config import ModelConfig
from model.mvdit import MVDiT
from pipeline.contract.cli import ArgumentParser, UnknownName, entry

PRESETS: dict[str, ModelConfig] = {
    # tests / CPU smoke runs: the authors' architecture, small enough to train on 2 CPU cores in minutes
    "tiny": ModelConfig(hidden=64, depth=2, heads=4, text_dim=32, text_len=64, control_depth=1, cond_heads=4,
                        box_mid_dim=32, map_stem=(8, 8, 16, 32)),
    # single-GPU experiments
    "small": ModelConfig(hidden=384, depth=8, heads=6, control_depth=4, cond_heads=6, box_mid_dim=256),
    # the authors' MagicDriveSTDiT3-XL/2 of their stage-2/3 configs (loads the released checkpoint)
    "paper": ModelConfig(),
}

# Their stage-1 config (images only): no temporal blocks, box / ego-pose tokens averaged over
# time, no per-box latent. train/configs/*stage1.yaml apply these as model_overrides.
STAGE1_OVERRIDES = {"temporal": False, "control_temporal": False, "box_sample_id": False, "cond_time_down": "mean"}


def build_model(preset: str, **overrides) -> MVDiT:
    """A freshly initialised MVDiT of a preset; `overrides` replace ModelConfig fields."""
    if preset not in PRESETS:
        raise UnknownName(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    return MVDiT(replace(PRESETS[preset], **overrides))


def build_from_config(config: ModelConfig | dict) -> MVDiT:
    """Rebuild from the config a checkpoint carries."""
    return MVDiT(config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def describe(name: str) -> dict:
    """Parameter counts of a preset, built on the meta device (no memory for `paper`)."""
    with torch.device("meta"):
        model = MVDiT(PRESETS[name])  # initialize() only writes meta tensors: nothing is allocated
    groups = {
        "backbone_blocks": ["base_blocks_s", "base_blocks_t"],
        "controlnet": ["control_blocks_s", "control_blocks_t", "before_proj", "x_control_embedder",
                       "controlnet_cond_embedder", "controlnet_cond_embedder_temp", "controlnet_cond_patchifier",
                       "map_attention"],
        "condition_encoders": ["t_embedder", "t_block", "fps_embedder", "y_embedder", "camera_embedder",
                               "frame_embedder", "bbox_embedder"],
    }
    parts = {"total": count_parameters(model)}
    for part, names in groups.items():
        parts[part] = sum(count_parameters(getattr(model, n)) for n in names if getattr(model, n, None) is not None)
    return {"preset": name, "config": PRESETS[name].to_dict(), "parameters": parts}


@entry
def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="mdv2-describe", description=(
        "Describe the MVDiT presets: parameter counts (total, backbone blocks, ControlNet with its map "
        "branch, condition encoders) and the config of each. Models are built on the meta device, so the "
        "1B+ 'paper' preset costs no memory."))
    ap.add_argument("--describe", action="store_true", help="print parameter counts (default action)")
    ap.add_argument("--preset", choices=sorted(PRESETS), action="append",
                    help="only this preset (repeatable); default: all")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    rows = [describe(n) for n in (args.preset or list(PRESETS))]
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    print(f"{'preset':8s} {'hidden':>6s} {'depth':>5s} {'heads':>5s} {'total':>14s} {'blocks':>14s} "
          f"{'controlnet':>14s} {'cond-enc':>12s}")
    for r in rows:
        c, p = r["config"], r["parameters"]
        print(f"{r['preset']:8s} {c['hidden']:6d} {c['depth']:5d} {c['heads']:5d} {p['total']:14,d} "
              f"{p['backbone_blocks']:14,d} {p['controlnet']:14,d} {p['condition_encoders']:12,d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
