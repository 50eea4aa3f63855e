"""The memory plan: estimated peak training memory per GPU of each stage bucket (issue 20 part 3).

    python -m model.memory                                  # markdown tables, paper preset, stages 1-3, 8 GPUs
    python -m model.memory --json --gpus 8 --gpu-gb 80      # one object per (stage, bucket)
    python -m model.memory calibrate                        # re-measure the coefficients (after a model change)

A stage is its train config (train/configs/stageN.yaml: preset, model_overrides, checkpointing,
sp, sharding) and its buckets (pipeline/configs/stages/stageN.yaml: batch size per SP group). Per GPU:

Static state (`static_bytes`), P parameters, world W = dp x sp GPUs:
- fsdp (train/sharding.py, FSDP2 over all W): fp32 weights + fp32 grads + AdamW moments + fp32
  EMA = 20 P / W; the root unit's bf16 weights whole (2 bytes each, kept through the step); per
  block unit in flight: its bf16 weights gathered plus the next one prefetched (2 x 2 bytes), its
  bf16 gradient and the fp32 reduce-scatter input (2 + 4 bytes): 10 bytes x the largest unit.
  `reshard_after_forward: false` (ZeRO-2) keeps every unit's bf16 weights: + 2 P.
- ddp: every GPU holds all of it: 4 + 4 + 8 + 4 = 20 P, + 2 P for the bf16 weight copies autocast
  keeps for the backward; the gradients are the reduction buckets (gradient_as_bucket_view).
- one GPU: as ddp.

Activations: calibrated, not guessed. `calibrate` builds a small instance of the preset (one block
pair, one ControlNet pair; the preset's width, heads and everything else), in the precision the
sharded trainer computes in (bf16 weights under bf16 autocast: the residual stream is bf16), and
counts the bytes of the tensors autograd saves (torch.autograd.graph.saved_tensors_hooks, storages
de-duplicated) per block kind (`block_kind`: class, children, flags) and for everything outside the
blocks, at five input shapes, with and without gradient checkpointing. A least-squares fit gives,
per kind, bytes = a x tokens + c x (view, latent frame) pairs (the cross-attention keys and values),
and outside the blocks a x tokens + c x view-frames + f x pixel frames (the BEV stem, measured at
the bucket's map grid) + d. The plan counts the kinds of the full model (built on the meta device)
and sums. With checkpointing the peak adds the costliest block's activations (recomputed in its
backward) and the gradients at a block boundary (BOUNDARY bytes per token per unit of width).
The coefficients live in model/memory_calibration.json with a fingerprint of the model they were
measured on (config, parameter count, block kinds): a model that changed is refused with the
command that re-measures it.

Sequence parallelism divides every per-token term by sp (ceil(S / sp) tokens per rank); the
per-view-frame and per-frame terms and the static state are not divided. Not modelled: the CUDA
context (~0.5-1 GB), allocator fragmentation (5-15 %): `fits` leaves 8 GB of each GPU for them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

CALIBRATION = Path(__file__).with_name("memory_calibration.json")
NUM_VIEWS = 6
BOUNDARY = 16        # bytes per token per D alive at a block boundary in the backward (bf16 grads in/out, fp32 sums)
SP_EXCHANGE = 8      # bytes per local token per D of one attention layer's all-to-all buffers (q, k, v, out; bf16)
HEADROOM_GB = 8.0    # left of each GPU for the CUDA context and fragmentation
SPS = (1, 2, 4)
# the calibration's input shapes: (views, pixel frames, latent height, latent width), batch 1
SHAPES = ((2, 1, 8, 16), (2, 1, 16, 32), (2, 5, 8, 16), (3, 1, 8, 16), (2, 9, 16, 32))


# ---- the model: kinds, counts, sizes -------------------------------------------------------------

def block_kind(block) -> str:
    """What a block's saved activations depend on: its class, its children and its flags."""
    flags = sorted(f"{k}={v}" for k, v in vars(block).items()
                   if not k.startswith("_") and k != "training" and isinstance(v, (bool, int, str)))
    return f"{type(block).__name__}({','.join(n for n, _ in block.named_children())};{','.join(flags)})"


def build(preset: str, overrides: dict | None = None, meta: bool = True):
    import torch
    from model.registry import build_model
    if not meta:
        return build_model(preset, **(overrides or {}))
    with torch.device("meta"):
        return build_model(preset, **(overrides or {}))


def model_facts(preset: str, overrides: dict | None = None) -> dict:
    """Parameter counts and block kinds of the full model (meta device: no memory)."""
    from model.parallel import block_units
    model = build(preset, overrides)
    units = block_units(model)
    kinds: dict[str, int] = {}
    for u in units:
        kinds[block_kind(u)] = kinds.get(block_kind(u), 0) + 1
    unit_params = [sum(p.numel() for p in u.parameters()) for u in units]
    total = sum(p.numel() for p in model.parameters())
    return {"params": total, "root_params": total - sum(unit_params), "max_unit_params": max(unit_params, default=0),
            "kinds": kinds, "config": model.config.to_dict(), "hidden": model.config.hidden,
            "patch": model.config.patch}


def n_params(preset: str, **overrides) -> int:
    return model_facts(preset, overrides)["params"]


def token_grid(height: int, width: int, frames: int, patch: int = 2) -> tuple[int, int]:
    """Pixel size and frame count -> (latent frames T', spatial tokens S per view and frame)."""
    tl = (frames - 1) // 4 + 1
    return tl, math.ceil(height // 8 / patch) * math.ceil(width // 8 / patch)


def bev_cells(height: int) -> int:
    """The BEV map grid of a bucket: the sample contract's rule when it has one (schema 3.0), else 200."""
    from pipeline.contract import schema
    rule = getattr(schema, "bev_grid", None)
    return int(rule(height)[0]) if rule else 200


# ---- static state -----------------------------------------------------------------------------------

def static_bytes(facts: dict, world: int = 1, sharding: str = "fsdp", reshard_after_forward: bool = True) -> float:
    """sharding: fsdp | ddp | none (one process: the trainer wraps nothing at world 1)."""
    P = facts["params"]
    if sharding in ("ddp", "none"):
        return 22.0 * P                                    # 20 fp32 bytes + the bf16 copies autocast keeps
    if sharding != "fsdp":
        raise ValueError(f"sharding {sharding!r}: fsdp, ddp or none")
    b = 20.0 * P / world + 2.0 * facts["root_params"] + 10.0 * facts["max_unit_params"]
    if not reshard_after_forward:
        b += 2.0 * (P - facts["root_params"])              # ZeRO-2: every unit's bf16 weights, forward to backward
    return b


# ---- calibration: saved-tensor bytes per block kind -----------------------------------------------

def measure_saved_bytes(model, x, t, cond, autocast: bool = True, per_block: bool = False):
    """Bytes of the distinct storages autograd saves in one forward (parameters excluded), on the
    CPU under bf16 autocast. per_block: -> ({block index: bytes}, bytes outside the blocks), a
    storage that several blocks save (an input they share) counting outside, one that a single
    block saves counting for that block (with gradient checkpointing the checkpoint saves a
    block's inputs just before the block runs: those are the block's)."""
    import torch
    from model.parallel import block_units
    blocks = block_units(model) if per_block else []
    current: list[int] = []
    owners: dict[tuple[int, int], set] = {}
    sizes: dict[tuple[int, int], int] = {}
    hooks = []
    def pack(tensor):
        st = tensor.untyped_storage()
        key = (st.data_ptr(), st.nbytes())
        sizes[key] = st.nbytes()
        owners.setdefault(key, set()).add(current[-1] if current else None)
        return tensor

    def enter(i: int, args) -> None:
        """Block i starts: what was saved of its inputs just before (the checkpoint's) is its too."""
        current.append(i)
        for a in args:
            if isinstance(a, torch.Tensor):
                st = a.untyped_storage()
                if (st.data_ptr(), st.nbytes()) in owners:
                    owners[(st.data_ptr(), st.nbytes())].add(i)

    for i, b in enumerate(blocks):
        hooks.append(b.register_forward_pre_hook(lambda m, a, i=i: enter(i, a)))
        hooks.append(b.register_forward_hook(lambda m, a, o: (current.pop(), None)[1]))   # None: output kept

    params = {(p.untyped_storage().data_ptr(), p.untyped_storage().nbytes()) for p in model.parameters()}
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                model(x, t, cond)
    finally:
        for h in hooks:
            h.remove()
    per: dict[int, int] = {}
    outside = 0
    for key, who in owners.items():
        if key in params:
            continue
        inside = who - {None}
        if len(inside) == 1:
            i = next(iter(inside))
            per[i] = per.get(i, 0) + sizes[key]
        else:
            outside += sizes[key]
    return (per, outside) if per_block else sum(per.values()) + outside


def _inputs(model, views: int, frames: int, h: int, w: int, text_len: int, boxes: int, cells: int, seed: int = 0):
    import torch
    from model.conditions import random_conditions
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    cond = random_conditions(1, views, frames, boxes=boxes, text_len=text_len, text_dim=cfg.text_dim,
                             bev_size=cells, generator=g)
    x = torch.randn(1, views, cfg.in_channels, (frames - 1) // 4 + 1, h, w, generator=g)
    return x, torch.rand(1, generator=g), cond      # float32, as the trainer passes them


def _fit(rows: list[list[float]], ys: list[float]) -> list[float]:
    import numpy as np
    sol, *_ = np.linalg.lstsq(np.array(rows, dtype=np.float64), np.array(ys, dtype=np.float64), rcond=None)
    return [float(v) for v in sol]


def calibrate(preset: str, overrides: dict | None = None, text_len: int = 300, boxes: int = 64, cells: int = 200,
              small: dict | None = None) -> dict:
    """Coefficients of `preset` + `overrides`, measured on a small instance (`small` overrides:
    default one block pair and one ControlNet pair). Bytes per token are per token of one rank."""
    import torch
    small = {"depth": 1, "control_depth": 1} if small is None else small
    torch.manual_seed(0)
    model = build(preset, {**(overrides or {}), **small}, meta=False).to(torch.bfloat16).train()
    from model.parallel import block_units
    kinds = [block_kind(b) for b in block_units(model)]
    out: dict = {}
    for ck in (False, True):
        model.enable_gradient_checkpointing(ck)
        feats_b, feats_r, ys_b, ys_r = [], [], {k: [] for k in set(kinds)}, []
        for v, f, h, w in SHAPES:
            x, t, cond = _inputs(model, v, f, h, w, text_len, boxes, cells)
            per, outside = measure_saved_bytes(model, x, t, cond, per_block=True)
            tl, S = x.shape[3], math.ceil(h / model.config.patch) * math.ceil(w / model.config.patch)
            tok, vf = v * tl * S, v * tl
            for k in set(kinds):
                idx = [i for i, kk in enumerate(kinds) if kk == k]
                ys_b[k].append(sum(per.get(i, 0) for i in idx) / len(idx))
            feats_b.append([tok, vf])
            feats_r.append([tok, vf, f, 1.0])
            ys_r.append(outside)
        D = model.config.hidden
        out["ckpt" if ck else "full"] = {
            "blocks": {k: dict(zip(("a", "c"), [c / D if j == 0 else c for j, c in enumerate(_fit(feats_b, ys))]))
                       for k, ys in ys_b.items()},
            "rest": dict(zip(("a", "c", "f", "d"), [c / D if j == 0 else c for j, c in enumerate(_fit(feats_r, ys_r))])),
        }
    return out


def fingerprint(facts: dict, text_len: int, boxes: int, cells: int) -> str:
    key = json.dumps({"config": facts["config"], "params": facts["params"], "kinds": facts["kinds"],
                      "text_len": text_len, "boxes": boxes, "cells": cells}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def calibration_key(preset: str, overrides: dict, cells: int) -> str:
    return f"{preset}|{json.dumps(overrides, sort_keys=True)}|G{cells}"


class Uncalibrated(LookupError):
    pass


def coefficients(preset: str, overrides: dict, text_len: int, boxes: int, cells: int, facts: dict,
                 table: dict | None = None) -> dict:
    """The stored coefficients of this model, refused when they were measured on another one."""
    table = json.loads(CALIBRATION.read_text()) if table is None else table
    key = calibration_key(preset, overrides, cells)
    entry = table.get(key)
    fp = fingerprint(facts, text_len, boxes, cells)
    if entry is None or entry["fingerprint"] != fp:
        why = "no coefficients" if entry is None else "coefficients of another model (the network changed)"
        raise Uncalibrated(f"memory plan: {why} for {key}; re-measure: python -m model.memory calibrate")
    return entry["coefficients"]


# ---- the estimate --------------------------------------------------------------------------------------

@dataclass
class Estimate:
    static: float           # bytes
    activations: float      # bytes
    tokens_per_rank: int

    @property
    def total(self) -> float:
        return self.static + self.activations


def activation_bytes(coef: dict, facts: dict, batch: int, height: int, width: int, frames: int, sp: int = 1,
                     checkpointing: bool = False, views: int = NUM_VIEWS) -> tuple[float, int]:
    """-> (bytes, tokens per rank) of one step's activations on one rank."""
    tl, S = token_grid(height, width, frames, facts["patch"])
    tok = batch * views * tl * math.ceil(S / sp)             # this rank's tokens
    vf, pf, D = batch * views * tl, batch * frames, facts["hidden"]

    def term(c: dict) -> float:
        return c["a"] * D * tok + c["c"] * vf

    full, ck = coef["full"], coef["ckpt"]
    use = ck if checkpointing else full
    saved = sum(n * term(use["blocks"][k]) for k, n in facts["kinds"].items()) + term(use["rest"])
    saved += use["rest"]["f"] * pf + use["rest"]["d"] * batch        # what the forward leaves for the backward
    extra = SP_EXCHANGE * D * tok if sp > 1 else 0.0
    if checkpointing:   # the backward recomputes one block at a time: its activations and the boundary gradients
        extra += max(term(full["blocks"][k]) for k in facts["kinds"]) + BOUNDARY * D * tok
    return max(saved, 0.0) + extra, tok


def saved_bytes(coef: dict, facts: dict, batch: int, height: int, width: int, frames: int,
                checkpointing: bool = False, views: int = NUM_VIEWS) -> float:
    """What autograd keeps after the forward (one process): the plan's part that the tests measure."""
    sp1 = activation_bytes(coef, facts, batch, height, width, frames, 1, checkpointing, views)[0]
    if checkpointing:
        tl, S = token_grid(height, width, frames, facts["patch"])
        tok = batch * views * tl * S
        sp1 -= max(coef["full"]["blocks"][k]["a"] * facts["hidden"] * tok + coef["full"]["blocks"][k]["c"]
                   * batch * views * tl for k in facts["kinds"]) + BOUNDARY * facts["hidden"] * tok
    return sp1


def estimate(coef: dict, facts: dict, batch: int, height: int, width: int, frames: int, sp: int = 1,
             dp: int = 1, checkpointing: bool = False, sharding: str = "fsdp", reshard_after_forward: bool = True,
             views: int = NUM_VIEWS) -> Estimate:
    """Peak bytes per GPU of one training step on one bucket (world = dp x sp GPUs)."""
    act, tok = activation_bytes(coef, facts, batch, height, width, frames, sp, checkpointing, views)
    return Estimate(static_bytes(facts, dp * sp, sharding, reshard_after_forward), act, tok)


# ---- stages --------------------------------------------------------------------------------------------

def read_stage(n: str) -> dict:
    """train config stage{n} (train/configs/stage{n}.yaml) + its buckets (pipeline/configs/stages/...): what the plan needs."""
    import yaml
    from train.config import config_path
    train = yaml.safe_load(config_path(f"stage{n}").read_text())
    stage = train.get("data", {}).get("stage", f"stage{n}")
    from pipeline.scenes.buckets import stage_path
    buckets = yaml.safe_load(stage_path(stage).read_text())["buckets"]
    return {"name": f"stage{n}", "preset": train.get("model", "paper"), "overrides": train.get("model_overrides") or {},
            "checkpointing": bool(train.get("grad_checkpointing", False)), "sp": int(train.get("sp", 1)),
            "sharding": train.get("sharding", "fsdp"), "reshard_after_forward": train.get("reshard_after_forward", True),
            "buckets": buckets}


def bucket_frames(b: dict, full_frames: int) -> int:
    return full_frames if b["num_frames"] == "full" else int(b["num_frames"])


def bucket_name(b: dict) -> str:
    return f"{b['height']}x{b['width']}_t{b['num_frames']}"


def plan(stages=("1", "2", "3"), gpus: int = 8, gpu_gb: float = 80.0, preset: str | None = None,
         full_frames: int = 241, text_len: int = 300, boxes: int = 64, table: dict | None = None) -> list[dict]:
    """One row per (stage, bucket): the peak at the stage's SP (dp = gpus / sp) and the least SP <= 4
    that fits gpu_gb - HEADROOM_GB (`fits`, None when none does)."""
    rows = []
    budget = (gpu_gb - HEADROOM_GB) * 1e9
    for n in stages:
        st = read_stage(n)
        pre = preset or st["preset"]
        facts = model_facts(pre, st["overrides"])
        for b in st["buckets"]:
            h, w, f = int(b["height"]), int(b["width"]), bucket_frames(b, full_frames)
            coef = coefficients(pre, st["overrides"], text_len, boxes, bev_cells(h), facts, table)
            by_sp = {}
            for sp in SPS:
                if gpus % sp:
                    continue
                e = estimate(coef, facts, int(b["batch_size"]), h, w, f, sp, gpus // sp, st["checkpointing"],
                             st["sharding"] if gpus > 1 else "none", st["reshard_after_forward"])
                by_sp[sp] = e
            sp = st["sp"] if st["sp"] in by_sp else max(by_sp)
            fits = next((s for s, e in sorted(by_sp.items()) if e.total <= budget), None)
            rows.append({"stage": st["name"], "bucket": bucket_name(b), "batch": int(b["batch_size"]), "sp": sp,
                         "dp": gpus // sp, "peak_gb": round(by_sp[sp].total / 1e9, 2), "fits": fits,
                         "static_gb": round(by_sp[sp].static / 1e9, 2),
                         "activations_gb": round(by_sp[sp].activations / 1e9, 2),
                         "peak_gb_by_sp": {str(s): round(e.total / 1e9, 2) for s, e in by_sp.items()},
                         "checkpointing": st["checkpointing"], "frames": f, "params": facts["params"]})
    return rows


def markdown(rows: list[dict], gpus: int, gpu_gb: float) -> str:
    sps = [s for s in SPS if gpus % s == 0]
    lines = ["| stage | bucket | batch | ckpt | " + " | ".join(f"SP={s} (dp {gpus // s})" for s in sps)
             + f" | at the stage's SP | fits {gpu_gb:.0f} GB |",
             "|" + "---|" * (6 + len(sps))]
    for r in rows:
        cells = [f"{r['peak_gb_by_sp'][str(s)]:.1f}" for s in sps]
        fit = f"SP={r['fits']}" if r["fits"] else "no"
        lines.append(f"| {r['stage']} | {r['bucket']} | {r['batch']} | {'on' if r['checkpointing'] else 'off'} | "
                     + " | ".join(cells) + f" | {r['peak_gb']:.1f} (SP={r['sp']}) | {fit} |")
    return "\n".join(lines)


def recalibrate(stages=("1", "2", "3"), preset: str | None = None, text_len: int = 300, boxes: int = 64,
                progress=print) -> dict:
    """Measure the coefficients of every (model, map grid) the stages use; write CALIBRATION."""
    table = json.loads(CALIBRATION.read_text()) if CALIBRATION.exists() else {}
    used = set()
    for n in stages:
        st = read_stage(n)
        pre = preset or st["preset"]
        facts = model_facts(pre, st["overrides"])
        for cells in sorted({bev_cells(int(b["height"])) for b in st["buckets"]}):
            key = calibration_key(pre, st["overrides"], cells)
            used.add(key)
            fp = fingerprint(facts, text_len, boxes, cells)
            if table.get(key, {}).get("fingerprint") == fp:
                continue
            progress(f"calibrating {key} ...")
            table[key] = {"fingerprint": fp, "params": facts["params"], "text_len": text_len, "boxes": boxes,
                          "coefficients": calibrate(pre, st["overrides"], text_len, boxes, cells)}
    if {"1", "2", "3"} <= set(map(str, stages)):   # all stages measured: entries of older models go
        table = {k: v for k, v in table.items() if k in used}
    CALIBRATION.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", nargs="?", choices=["plan", "calibrate"], default="plan",
                    help="plan (default): the table; calibrate: re-measure the coefficients (minutes on a CPU)")
    ap.add_argument("--stages", nargs="+", default=["1", "2", "3"], help="stage numbers (train configs stageN: train/configs/stageN.yaml)")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs of the run: world = dp x sp (default 8)")
    ap.add_argument("--gpu-gb", type=float, default=80.0, help="memory of one GPU; fits = peak <= this - 8 GB")
    ap.add_argument("--preset", help="model preset instead of each stage config's")
    ap.add_argument("--full-frames", type=int, default=241, help="frames of a 'full' bucket clip (20 s at 12 Hz)")
    ap.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    a = ap.parse_args(argv)
    if a.gpus < 1:
        ap.error("--gpus must be >= 1")
    try:
        if a.action == "calibrate":
            recalibrate(a.stages, a.preset, progress=lambda m: print(m, file=sys.stderr))
        rows = plan(a.stages, a.gpus, a.gpu_gb, a.preset, a.full_frames)
    except FileNotFoundError as e:
        ap.error(f"not found: {e.filename}")
    except Uncalibrated as e:
        ap.error(str(e))
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    params = ", ".join(f"{st} {p / 1e9:.2f}B" for st, p in {r["stage"]: r["params"] for r in rows}.items())
    print(f"estimated peak GB per GPU on {a.gpus} x {a.gpu_gb:.0f} GB (fits: <= {a.gpu_gb - HEADROOM_GB:.0f} GB); "
          f"parameters: {params}")
    print(markdown(rows, a.gpus, a.gpu_gb))
    return 0


if __name__ == "__main__":
    sys.exit(main())
