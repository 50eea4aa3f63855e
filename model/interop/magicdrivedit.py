"""Interop with the authors' MagicDriveDiT: their checkpoints in, their input layout as an entry point.

    python -m model.interop.magicdrivedit convert --ckpt ckpts/MagicDriveDiT-stage3-40k-ft/ema.pt \\
        --config MagicDriveDiT/configs/magicdrive/train/stage3_...py --out runs/release
    python -m model.interop.magicdrivedit keys --config their_config.py      # our key list, for a diff

`convert` reads their ema.pt (torch.load(weights_only=True)), their `model/` folder (ColossalAI's
sharded save: an index JSON naming the shard of every key, read shard by shard), or a
.safetensors file, checks that the keys are exactly this network's (MVDiT names its modules as
theirs: the rename is the identity after a DDP `module.` prefix is stripped) with the same shapes,
and writes a checkpoint folder (model.safetensors, ema.safetensors, config.json) that
`mdv2-sample --ckpt`, `mdv2-train --init-from` and bench/gpu.py read. Both weight files hold the
converted weights (fp32).

`forward(model, **kwargs)` takes exactly their MagicDriveSTDiT3.forward keyword arguments and
returns their output (x0 - eps, views folded into channels): the parity test calls it.

Exit codes: 0 done, 2 a user mistake (one `error:` line: a missing file, a checkpoint that is not
a plain tensor state dict, keys left over or missing, a config this network does not implement).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.interop.authors_config import read_model_kwargs, to_model_config
from pipeline.contract.cli import ArgumentParser, BadInput, InputNotFound, entry

INDEX_NAMES = ("pytorch_model.bin.index.json", "model.safetensors.index.json")
LEGACY_KEYS = ("pos_embed", "pos_embed_temporal")  # their loader drops these (fixed sincos tables of old models)


def forward(model, **kwargs) -> torch.Tensor:
    """Their MagicDriveSTDiT3.forward(x, timestep, y, maps, bbox, cams, rel_pos, fps, height, width,
    drop_cond_mask=None, drop_frame_mask=None, mv_order_map=None, t_order_map=None, mask=None,
    x_mask=None, **kwargs) on this project's MVDiT: x (B, C V, T', H', W'), timestep in [0, 1000],
    y (B, 1, L, 4096), mask (B, L), bbox {bboxes (B V, T, N, 8, 3), classes, masks (B V, T, N),
    box_latent (B V, T, N, D)}, cams (B V, T, 1, 3, 7), rel_pos (B V, T, 1, 4|3, 4), maps
    (B, T, 8, G, G), fps / height / width (B,) -> x0 - eps (B, C V, T', H', W') float32.
    Extra keys their scripts pass along (num_frames) are ignored, as their forward does."""
    if kwargs.get("t_order_map") is not None:
        raise ValueError("t_order_map (their use_st_cross_attn) is not supported")
    return model.forward_native(**kwargs)


# ---- reading their checkpoints -----------------------------------------------------------------
def _tensor_dict(obj, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items()):
        kind = type(obj).__name__ if not isinstance(obj, dict) else "a dict with non-tensor values"
        raise BadInput(f"{where}: not a plain tensor state dict ({kind}); give their ema.pt, their model/ "
                       "folder or a .safetensors file")
    return obj


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise BadInput(f"{path}: not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickles with objects, truncated files, ...
        raise BadInput(f"{path}: not a plain tensor state dict readable with torch.load(weights_only=True) "
                       f"({str(e).splitlines()[0][:160]})") from None
    return _tensor_dict(obj, str(path))


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Their ema.pt / .safetensors / sharded model folder -> {key: tensor}."""
    p = Path(path)
    if p.is_dir():
        index = next((p / n for n in INDEX_NAMES if (p / n).is_file()), None)
        if index is None:
            single = [p / n for n in ("pytorch_model.bin", "model.safetensors") if (p / n).is_file()]
            if single:
                return _load_file(single[0])
            raise InputNotFound(f"{p}: a folder without {' or '.join(INDEX_NAMES)} (their model/ folder has one)")
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise BadInput(f"{index}: not a shard index (a JSON with 'weight_map': {e})") from None
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            f = p / shard
            if not f.is_file():
                raise InputNotFound(f"{index} names shard {shard}, which is not in {p}")
            part = _load_file(f)
            want = {k for k, v in weight_map.items() if v == shard}
            if want - set(part):
                raise BadInput(f"{f}: lacks {sorted(want - set(part))[:5]} that {index.name} places there")
            out.update({k: part[k] for k in want})
            del part
        return out
    if not p.is_file():
        raise InputNotFound(f"--ckpt {path}: no such file or folder")
    return _load_file(p)


def rename(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Their keys -> ours: a DDP `module.` prefix stripped, their loader's legacy keys dropped."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return {k: v for k, v in state.items() if k not in LEGACY_KEYS}


def check_keys(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], where: str) -> None:
    left, missing = sorted(set(state) - set(target)), sorted(set(target) - set(state))
    if left or missing:
        parts = []
        if left:
            parts.append(f"{len(left)} keys left over: {', '.join(left[:6])}{' ...' if len(left) > 6 else ''}")
        if missing:
            parts.append(f"{len(missing)} keys missing: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
        raise BadInput(f"{where}: {'; '.join(parts)} (is --config the checkpoint's config?)")
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}" for k in target if state[k].shape != target[k].shape]
    if bad:
        raise BadInput(f"{where}: {len(bad)} shapes differ from the config's network: {'; '.join(bad[:4])}")


def convert(ckpt: str | Path, config: str | Path, out: str | Path, stage: str = "stage3") -> dict:
    """-> a checkpoint folder; its train config names `stage` (pipeline/configs/stages/<name>.yaml or a path), the
    buckets `mdv2-sample --ckpt` reads conditions from (their stage 3: every nuScenes bucket)."""
    from model.registry import build_from_config
    from train.config import DataConfig, TrainConfig
    mcfg = to_model_config(read_model_kwargs(config))
    with torch.device("meta"):
        target = build_from_config(mcfg).state_dict()
    state = rename(read_checkpoint(ckpt))
    check_keys(state, target, f"--ckpt {ckpt}")
    weights = {k: v.detach().float().contiguous() for k, v in state.items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "model.safetensors"))
    save_file(weights, str(out / "ema.safetensors"))
    train = TrainConfig(out=str(out), model="paper", data=DataConfig(stage=stage)).to_dict()
    source = {"ckpt": str(ckpt), "config": str(config), "tensors": len(weights)}
    (out / "config.json").write_text(json.dumps({"train": train, "model": mcfg.to_dict(), "converted_from": source},
                                                indent=2, sort_keys=True))
    return {"out": str(out), **source, "parameters": sum(v.numel() for v in weights.values())}


def model_keys(config: ModelConfig) -> dict[str, list[int]]:
    """{key: shape} of the network a config builds (on the meta device)."""
    from model.registry import build_from_config
    with torch.device("meta"):
        return {k: list(v.shape) for k, v in build_from_config(config).state_dict().items()}


@entry
def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m model.interop.magicdrivedit", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="their checkpoint -> a checkpoint folder of this project")
    c.add_argument("--ckpt", required=True, help="their ema.pt, their model/ folder (sharded, with an index JSON) "
                                                 "or a .safetensors file")
    c.add_argument("--config", required=True, help="their config .py (read with ast), a model folder's config.json, "
                                                   "or a JSON of the config's model dict")
    c.add_argument("--out", required=True, help="folder for model.safetensors, ema.safetensors, config.json")
    c.add_argument("--stage", default="stage3", help="stage config recorded for mdv2-sample (the buckets it reads "
                                                     "conditions from): pipeline/configs/stages/<name>.yaml or a path")
    k = sub.add_parser("keys", help="print {key: shape} of the network their config builds (JSON)")
    k.add_argument("--config", required=True)
    a = ap.parse_args(argv)
    if a.cmd == "keys":
        print(json.dumps(model_keys(to_model_config(read_model_kwargs(a.config))), indent=1))
        return 0
    print(json.dumps(convert(a.ckpt, a.config, a.out, a.stage)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
