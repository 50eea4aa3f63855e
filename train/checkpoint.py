"""Checkpoints: a folder per step, no pickle.

    {out}/checkpoints/step-0000300/
        model.safetensors   trained weights (fp32)
        ema.safetensors     EMA weights (fp32): what sampling uses by default
        state.pt            step, optimizer, RNG, data position: torch.load(weights_only=True)
        config.json         {"train": TrainConfig, "model": ModelConfig}: enough to rebuild the run
    {out}/checkpoints/latest   name of the newest complete folder

A folder is written under a temporary name and renamed when complete, so ``latest``
never points at a half-written checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.contract.cli import InputNotFound

CKPT_DIR = "checkpoints"
LATEST = "latest"


def state_dict_fp32(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().contiguous().clone() for k, v in module.state_dict().items()}


def save_checkpoint(out: str | Path, step: int, model: torch.nn.Module, ema: torch.nn.Module,
                    state: dict, config: dict, keep_last: int = 3) -> Path:
    root = Path(out) / CKPT_DIR
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(state_dict_fp32(model), str(tmp / "model.safetensors"))
    save_file(state_dict_fp32(ema), str(tmp / "ema.safetensors"))
    torch.save(state, tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    (root / (LATEST + ".tmp")).write_text(final.name)
    os.replace(root / (LATEST + ".tmp"), root / LATEST)
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder / its checkpoints folder (-> the latest checkpoint)."""
    p = Path(path)
    for cand in (p, p / CKPT_DIR):
        if (cand / LATEST).exists():
            return cand / (cand / LATEST).read_text().strip()
    if (p / "state.pt").exists() or ((p / "model.safetensors").exists() and (p / "config.json").exists()):
        return p   # a checkpoint, or an export of weights alone (model.interop.magicdrivedit convert)
    raise InputNotFound(f"{path}: not a checkpoint folder (state.pt) nor a run with {CKPT_DIR}/{LATEST}")


def load_config(path: str | Path) -> dict:
    return json.loads((resolve(path) / "config.json").read_text())


def load_weights(path: str | Path, which: str = "ema") -> dict[str, torch.Tensor]:
    if which not in ("ema", "model"):
        raise ValueError(f"weights {which!r}: use 'ema' or 'model'")
    return load_file(str(resolve(path) / f"{which}.safetensors"))


def load_state(path: str | Path) -> dict:
    return torch.load(resolve(path) / "state.pt", weights_only=True)
