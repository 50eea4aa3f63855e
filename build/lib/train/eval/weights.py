"""Loading the feature networks' weights from local files: torch.load(weights_only=True), then an exact key check.

A wrong file is a user's mistake with one clear line: which file, and what is wrong with it (not a
state dict, missing or unexpected keys, a tensor of the wrong shape). The channel divisor (1 for
the published networks, more for the tests' tiny ones) is read from the stem convolution's shape
before the check, so a narrower file of the same layout loads through the same path.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from pipeline.contract import cli

OPTIONAL_SUFFIX = "num_batches_tracked"  # BatchNorm's counter: absent from both published files, unused in eval


@dataclass(frozen=True)
class NetworkSpec:
    name: str                 # "I3D" | "InceptionV3"
    file_name: str            # the published file's name (for messages)
    stem_key: str             # the first convolution's weight: its output channels give the divisor
    stem_channels: int        # ... at divisor 1
    divisors: tuple[int, ...]
    build: Callable[[int], nn.Module]


@dataclass(frozen=True)
class Loaded:
    model: nn.Module
    path: str
    sha256: str
    divisor: int

    def describe(self) -> dict:
        return {"path": os.path.abspath(self.path), "sha256": self.sha256, "divisor": self.divisor}


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _few(names, n: int = 3) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def read_state_dict(path: str, spec: NetworkSpec) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise cli.InputNotFound(f"{spec.name} weights {path} do not exist: put {spec.file_name} there or pass its "
                                "path (docs/eval.md says where to get it)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any failure to unpickle safely means "not a state dict file"
        raise cli.BadInput(f"{spec.name} weights {path}: not a PyTorch state dict that loads with weights_only=True "
                           f"({type(e).__name__}: {cli.one_line(e)[:200]}); expected {spec.file_name}") from None
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                     for k, v in sd.items()):
        raise cli.BadInput(f"{spec.name} weights {path}: not a state dict (a dict of name -> tensor), got "
                           f"{type(sd).__name__}; expected {spec.file_name}")
    return sd


def infer_divisor(sd: dict[str, torch.Tensor], path: str, spec: NetworkSpec) -> int:
    stem = sd.get(spec.stem_key)
    if stem is None:
        raise cli.BadInput(f"{spec.name} weights {path}: no {spec.stem_key}; this is not {spec.file_name} "
                           f"(its keys start {_few(sd)})")
    out = int(stem.shape[0])
    if out == 0 or spec.stem_channels % out or spec.stem_channels // out not in spec.divisors:
        raise cli.BadInput(f"{spec.name} weights {path}: {spec.stem_key} has shape {tuple(stem.shape)}, expected "
                           f"{spec.stem_channels} output channels; this is not {spec.file_name}")
    return spec.stem_channels // out


def check_keys(model: nn.Module, sd: dict[str, torch.Tensor], path: str, spec: NetworkSpec) -> dict[str, torch.Tensor]:
    """The file's tensors for model.load_state_dict(strict=True), or a BadInput naming what does not fit."""
    want = model.state_dict()
    required = {k for k in want if not k.endswith(OPTIONAL_SUFFIX)}
    missing = required - sd.keys()
    unexpected = sd.keys() - want.keys()
    if missing or unexpected:
        parts = ([f"{len(missing)} missing keys ({_few(missing)})"] if missing else []) + \
                ([f"{len(unexpected)} unexpected keys ({_few(unexpected)})"] if unexpected else [])
        raise cli.BadInput(f"{spec.name} weights {path}: {'; '.join(parts)}; expected the layout of {spec.file_name}")
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {tuple(want[k].shape)})" for k in sorted(required)
             if sd[k].shape != want[k].shape]
    if wrong:
        raise cli.BadInput(f"{spec.name} weights {path}: {len(wrong)} tensors of the wrong shape: {_few(wrong, 2)}; "
                           f"expected the layout of {spec.file_name}")
    full = dict(sd)
    for k in want.keys() - sd.keys():      # the optional BatchNorm counters
        full[k] = want[k]
    return full


def load(path: str, spec: NetworkSpec, device: str = "cpu") -> Loaded:
    sd = read_state_dict(path, spec)
    divisor = infer_divisor(sd, path, spec)
    model = spec.build(divisor)
    model.load_state_dict(check_keys(model, sd, path, spec), strict=True)
    model.eval().requires_grad_(False)
    return Loaded(model.to(device), path, file_sha256(path), divisor)


def _i3d(divisor: int) -> nn.Module:
    from train.eval.i3d import I3D
    return I3D(divisor)


def _inception(divisor: int) -> nn.Module:
    from train.eval.inception import FIDInceptionV3
    return FIDInceptionV3(divisor)


def _specs() -> dict[str, NetworkSpec]:
    from train.eval import i3d, inception
    return {
        "fvd": NetworkSpec("I3D", "i3d_pretrained_400.pt", "Conv3d_1a_7x7.conv3d.weight", i3d.STEM_CHANNELS,
                           i3d.DIVISORS, _i3d),
        "fid": NetworkSpec("InceptionV3", "pt_inception-2015-12-05-6726825d.pth", "Conv2d_1a_3x3.conv.weight",
                           inception.STEM_CHANNELS, inception.DIVISORS, _inception),
    }


SPECS = _specs()
