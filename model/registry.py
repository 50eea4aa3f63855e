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
    # tests / CPU smoke runs: a 6-view 9-frame 64x128 step is well under a second on CPU
    "tiny": ModelConfig(hidden=64, depth=2, heads=4, text_dim=32, controlnet_depth=1, fourier_freqs=4,
                        bev_stem=(8, 16, 32), pe_base=8.0),
    # single-GPU experiments
    "small": ModelConfig(hidden=384, depth=8, heads=6, text_dim=4096, controlnet_depth=4,
                         bev_stem=(16, 64, 192), pe_base=16.0),
    # STDiT-3-XL/2 sizes (Open-Sora 1.2) with T5-v1.1-XXL text, as MagicDrive-V2; ControlNet copies
    # half of the depth as in MagicDrive's map branch
    "paper": ModelConfig(hidden=1152, depth=28, heads=16, text_dim=4096, controlnet_depth=13),
}


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
    parts = {
        "total": count_parameters(model),
        "backbone_blocks": count_parameters(model.blocks),
        "controlnet": count_parameters(model.controlnet) if model.controlnet is not None else 0,
        "condition_encoders": sum(count_parameters(m) for m in (model.text_proj, model.camera, model.boxes,
                                                                model.traj, model.t_embedder)),
    }
    return {"preset": name, "config": PRESETS[name].to_dict(), "parameters": parts}


@entry
def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="mdv2-describe", description=(
        "Describe the MVDiT presets: parameter counts (total, backbone blocks, BEV ControlNet, "
        "condition encoders) and the config of each. Models are built on the meta device, so the "
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
