"""Checkpoints: a folder per step, no pickle, never half-written.

    {out}/checkpoints/step-0000300/
        sharded/            the training state, sharded as it was trained (torch.distributed.checkpoint
                            in safetensors files, one per rank): model.*, ema.*, optim.* entries
        model.safetensors   export: the full fp32 weights, keys = model.state_dict() keys
        ema.safetensors     export: the full fp32 EMA (what sampling uses by default)
        config.json         {"train": TrainConfig, "model": ModelConfig}: enough to rebuild the run
        state.json          step, data position, world / sharding it was written at
    {out}/checkpoints/latest   name of the newest complete folder

The three export files are what `--init-from`, `mdv2-sample`, bench/gpu.py and the weight
converter read (`resolve`, `load_config`, `load_weights`); a folder holding only them (the
converter's) is a valid source of weights, not of a resumable run. `--resume` reads the
sharded state (`load_training_state`) at any world size and sharding: the checkpoint planner
reshards every tensor to the layout of the run that loads it.

Atomic: every rank writes into `.tmp-step-NNNNNNN`, rank 0 adds the exports and renames the
complete folder into place, then points `latest` at it (write + rename). A save killed at
any point leaves `latest` on the previous complete checkpoint; the next save removes the
stale temporary folder. Pruning (`keep_last`) only ever removes checkpoints of lower steps
than the one just written, never that one and never the one `latest` names.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from pipeline.contract import cli
from pipeline.contract.cli import BadInput, InputNotFound
from train.distributed import barrier
from train.sharding import full_tensor

CKPT_DIR = "checkpoints"
LATEST = "latest"
SHARDED = "sharded"
EXPORT = ("model.safetensors", "ema.safetensors", "config.json")
STEP_RE = re.compile(r"^step-(\d+)$")


# ---- readers: the export (every consumer of weights) ------------------------------------------

def resolve(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder / its checkpoints folder (-> the latest checkpoint)."""
    p = Path(path)
    for cand in (p, p / CKPT_DIR):
        if (cand / LATEST).exists():
            target = cand / (cand / LATEST).read_text().strip()
            if not (target / "config.json").exists():
                raise InputNotFound(f"{cand / LATEST} names {target.name}, which is not a complete checkpoint")
            return target
    if (p / "config.json").exists() and ((p / "model.safetensors").exists() or (p / SHARDED).is_dir()):
        return p
    raise InputNotFound(f"{path}: not a checkpoint folder (config.json + model.safetensors) nor a run with "
                        f"{CKPT_DIR}/{LATEST}")


def load_config(path: str | Path) -> dict:
    return json.loads((resolve(path) / "config.json").read_text())


def load_weights(path: str | Path, which: str = "ema") -> dict[str, torch.Tensor]:
    if which not in ("ema", "model"):
        raise ValueError(f"weights {which!r}: use 'ema' or 'model'")
    f = resolve(path) / f"{which}.safetensors"
    if not f.exists():
        raise InputNotFound(f"{f} is missing: this checkpoint was written with export: false; "
                            f"write it with: python -m train.checkpoint export {f.parent}")
    return load_file(str(f))


def load_state(path: str | Path) -> dict:
    """The small JSON part of a resumable checkpoint: step, data position, world, sharding."""
    f = resolve(path) / "state.json"
    if not f.exists():
        raise InputNotFound(f"{f.parent} holds weights only (no state.json / {SHARDED}/): it cannot be "
                            "resumed; start a new run from its weights with --init-from")
    return json.loads(f.read_text())


# ---- the sharded training state ------------------------------------------------------------------

def _flat_state(model: torch.nn.Module, opt: torch.optim.Optimizer, ema) -> tuple[dict, dict, dict]:
    """{"model.<fqn>", "ema.<fqn>", "optim.<fqn>.<slot>": tensor}: tensors only (the optimizer's
    hyperparameters come from the config), so the files are safetensors and need no unpickling."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(model, opt)   # FQN keys whatever the wrapping; initialises empty Adam state
    flat = {f"model.{k}": v for k, v in msd.items()}
    flat.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    for fqn, slots in osd["state"].items():
        for slot, v in slots.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"optimizer state {fqn}.{slot} is a {type(v).__name__}, not a tensor")
            flat[f"optim.{fqn}.{slot}"] = v
    return flat, msd, osd


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every single-process save/load that it assumes one process: here it is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_sharded(folder: Path, model, opt, ema) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    flat, _, _ = _flat_state(model, opt, ema)
    with _quiet_single_process():
        dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(folder), save_distributed=True),
                 no_dist=not dist.is_initialized())


def load_training_state(path: str | Path, model, opt, ema) -> dict:
    """Load weights, EMA and optimizer state of checkpoint `path` into this run's (sharded or
    not) model, EMA and optimizer, in place; -> its state.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import set_state_dict
    src = resolve(path)
    state = load_state(src)
    if not (src / SHARDED).is_dir():
        raise InputNotFound(f"{src}: no {SHARDED}/ training state; start a new run from its weights with --init-from")
    flat, msd, osd = _flat_state(model, opt, ema)
    with _quiet_single_process():
        dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(src / SHARDED)), no_dist=not dist.is_initialized())
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    return state


# ---- the export ------------------------------------------------------------------------------------

def full_state_dict(tensors: dict[str, torch.Tensor], write: bool) -> dict[str, torch.Tensor]:
    """fp32 CPU copies of whole tensors, gathered from their shards one at a time (every rank
    calls it; only the rank that writes keeps them)."""
    out = {}
    for k, v in tensors.items():
        v = full_tensor(v.detach())
        if write:
            out[k] = v.float().cpu().contiguous().clone()
    return out


def state_dict_fp32(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().contiguous().clone() for k, v in module.state_dict().items()}


# ---- the folder protocol -------------------------------------------------------------------------

def step_of(p: Path) -> int | None:
    m = STEP_RE.match(p.name)
    return int(m.group(1)) if m else None


def latest_name(root: Path) -> str | None:
    f = root / LATEST
    return f.read_text().strip() if f.exists() else None


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())


def _point_latest(root: Path, name: str) -> None:
    tmp = root / (LATEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    _fsync_dir(root)


def clean_stale(root: Path) -> list[Path]:
    """Remove temporary folders of saves that never finished (a killed run), except one that
    `latest` names (a save killed between its two renames leaves `latest` there)."""
    keep = latest_name(root)
    gone = [p for p in root.glob(".tmp-*") if p.name != keep]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return gone


def prune(root: Path, written: Path, keep_last: int) -> list[Path]:
    """Keep `written` and the keep_last - 1 newest checkpoints below its step; remove older ones.
    Never `written`, never what `latest` names, never a checkpoint of a higher step (another
    history in this folder, e.g. after resuming from an earlier step: not ours to order)."""
    if keep_last <= 0:
        return []
    step = step_of(written)
    below = sorted((p for p in root.glob("step-*") if p.is_dir() and (step_of(p) or -1) < step), key=step_of)
    protect = {written.name, latest_name(root)}
    gone = [p for p in below[:max(0, len(below) - (keep_last - 1))] if p.name not in protect]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def _publish(root: Path, tmp: Path, final: Path) -> None:
    """Move the complete `tmp` into place as `final` and point `latest` at it. When `final`
    exists (a resumed run saving a step again), `latest` first names the complete `tmp`, so at
    no moment does it name a missing or partial folder."""
    if final.exists():
        _point_latest(root, tmp.name)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _point_latest(root, final.name)


def save_checkpoint(out: str | Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer, ema,
                    state: dict, config: dict, keep_last: int = 3, export: bool = True, rank: int = 0) -> Path:
    """Write step `step` (a collective: every rank calls it). -> the checkpoint folder."""
    root = Path(out) / CKPT_DIR
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"          # one name for every rank: they write into one folder
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        clean_stale(root)
        tmp.mkdir()
    barrier()
    save_sharded(tmp / SHARDED, model, opt, ema)
    if export:   # gathered one tensor at a time; rank 0 holds the whole fp32 copy of one of them at once
        for name, tensors in (("model", model.state_dict()), ("ema", ema.state_dict())):
            full = full_state_dict(tensors, write=rank == 0)
            if rank == 0:
                save_file(full, str(tmp / f"{name}.safetensors"))
            del full
    if rank == 0:
        for f in tmp.glob("*.safetensors"):
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "state.json", dict(state, step=step))
        _fsync_dir(tmp)
        _publish(root, tmp, final)
        prune(root, final, keep_last)
    barrier()   # every rank returns once the checkpoint is `latest`
    return final


# ---- a run folder --------------------------------------------------------------------------------

def claim_run_dir(out: str | Path, resume: bool, overwrite: bool, rank: int = 0, init_from: str | None = None) -> None:
    """A new run refuses an --out that holds another run (its log or checkpoints) unless told:
    --resume continues it, --overwrite deletes its checkpoints and log first (rank 0).
    Every rank checks (one filesystem), so every rank stops with the same error."""
    out = Path(out)
    held = [p for p in (out / "log.jsonl", out / CKPT_DIR) if p.exists()]
    if resume or not held:
        return
    if overwrite and init_from and (out / CKPT_DIR).resolve() in Path(init_from).resolve().parents:
        raise BadInput(f"--overwrite would delete {init_from}, the --init-from checkpoint: choose another --out")
    if not overwrite:
        raise BadInput(f"--out {out} already holds a run ({', '.join(p.name for p in held)}): continue it with "
                       "--resume, start over there with --overwrite (deletes its checkpoints and log), or choose "
                       "another --out")
    barrier()   # every rank has seen the folder before rank 0 empties it
    if rank == 0:
        shutil.rmtree(out / CKPT_DIR, ignore_errors=True)
        (out / "log.jsonl").unlink(missing_ok=True)
    barrier()


def truncate_log(log: Path, step: int) -> int:
    """Keep the records of steps <= `step` (a resumed run redoes the later ones); -> records dropped.
    A torn last line (a killed write) goes too."""
    if not log.exists():
        return 0
    keep, dropped = [], 0
    for line in log.read_text().splitlines():
        try:
            ok = int(json.loads(line)["step"]) <= step
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = log.with_name(log.name + ".tmp")
        tmp.write_text("".join(k + "\n" for k in keep))
        os.replace(tmp, log)
    return dropped


# ---- python -m train.checkpoint export CKPT -------------------------------------------------------

def export_from_sharded(path: str | Path) -> Path:
    """Write the export files of a checkpoint saved with `export: false`, in one process (the
    sharded state is read back whole, whatever world size wrote it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from model.registry import build_from_config
    src = resolve(path)
    with torch.device("meta"):
        model = build_from_config(load_config(src)["model"])
    keys = model.state_dict()
    flat = {f"{which}.{k}": torch.empty(v.shape, dtype=torch.float32) for which in ("model", "ema")
            for k, v in keys.items()}
    with _quiet_single_process():   # only these keys are read
        dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(src / SHARDED)), no_dist=True)
    for which in ("model", "ema"):
        save_file({k: flat[f"{which}.{k}"] for k in keys}, str(src / f"{which}.safetensors"))
    return src


@cli.entry
def main(argv: list[str] | None = None) -> int:
    ap = cli.ArgumentParser(prog="python -m train.checkpoint", description=(
        "Checkpoint tools. export CKPT: write model.safetensors and ema.safetensors (full fp32 weights) "
        "from the sharded training state of a checkpoint saved with export: false."))
    ap.add_argument("action", choices=["export"])
    ap.add_argument("ckpt", help="checkpoint folder, or a run folder (its latest checkpoint)")
    a = ap.parse_args(argv)
    print(export_from_sharded(a.ckpt))
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
