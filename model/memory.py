"""Estimated peak training memory per GPU (issue 13 part 6): static state + activations.

    python -m model.memory --preset paper --stage configs/stages/stage3.yaml          # table
    python -m model.memory --preset paper --stage configs/stages/stage3.yaml --markdown

Static (every rank holds all of it; no ZeRO sharding in this trainer), bytes per parameter:
fp32 weights 4 + fp32 grads 4 + AdamW moments 8 + fp32 EMA 4 + the bf16 weight copies that
autocast makes and autograd keeps until the backward 2 = 22.

Activations under bf16 autocast, per latent token per unit of hidden size D (bytes). The
coefficients come from counting the tensors autograd saves (torch.autograd.graph
saved_tensors_hooks, storages de-duplicated; `measure_saved_bytes`) for the real MVDiT under
bf16 autocast on the CPU, differencing two token counts so the per-token slope is isolated, and
differencing configs (depth, cross_view, temporal, control_depth of the `small` preset) so each
part is isolated (recalibrated for the authors' block structure, issue 21):
  a spatial block (self-attention + cross-attention + MLP)                   BLOCK_S = 72
  its cross-view attention (two neighbour attentions, summed; base blocks)   CV_RING = 72
  a temporal block (self-attention over T' + cross-attention + MLP)          BLOCK_T = 68
  ControlNet extras per depth index (after_proj outputs, the skip sums)      CN_PAIR = 4
  outside the blocks (patch embedders, map tokens, final layer)              OUTSIDE = 17
ControlNet blocks are a spatial block without cross-view and a temporal block per index
i < control_depth. The residual stream is fp32 (the fp32 adaLN tables promote it), so a
checkpointed block keeps 4 bytes per D per token (its input); the ControlNet residuals add 4
more per ControlNet block. With checkpointing the peak adds one block's activations
(recomputed in the backward) and the gradient at its boundary.

Not split by sequence parallelism (replicated on every rank of an SP group): static state,
the cross-attention keys/values materialised per (view, latent frame) (2 x Lc x D bf16 per
block), and the BEV ControlNet stem (per pixel frame). Split: every per-token term, over
ceil(S / sp) spatial tokens per rank. Not modelled: the CUDA context (~0.5-1 GB), allocator
fragmentation (often 5-15 %), SP all-to-all buffers (a few D per token, transient).
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace

from pipeline.contract.cli import HelpFormatter

BYTES_PER_PARAM = {"weights": 4, "grads": 4, "adam": 8, "ema": 4, "bf16_copies": 2}
BLOCK_S, BLOCK_T = 72, 68
CV_RING = 72
CN_PAIR = 4
OUTSIDE = 17
CKPT_BLOCK_INPUT = 4        # fp32 residual stream saved at each checkpointed block
CKPT_CN_RESIDUAL = 4        # bf16 ControlNet residual + bf16 input of its output projection
BOUNDARY_GRAD = 16          # gradients alive at a block boundary during the backward
NUM_VIEWS = 6


@dataclass
class Estimate:
    static: float           # bytes
    activations: float      # bytes
    tokens_per_rank: int

    @property
    def total(self) -> float:
        return self.static + self.activations


def n_params(preset: str, **overrides) -> int:
    """Exact parameter count, the model built on the meta device."""
    import torch
    from model.mvdit import MVDiT
    from model.registry import PRESETS
    with torch.device("meta"):
        return sum(p.numel() for p in MVDiT(replace(PRESETS[preset], **overrides)).parameters())


def static_bytes(params: int) -> float:
    return float(params * sum(BYTES_PER_PARAM.values()))


def token_grid(height: int, width: int, frames: int, patch: int = 2) -> tuple[int, int]:
    """Pixel size and frame count -> (latent frames T', spatial tokens S per view and frame)."""
    tl = (frames - 1) // 4 + 1
    return tl, math.ceil(height // 8 / patch) * math.ceil(width // 8 / patch)


def block_coefficient(cfg, views: int = NUM_VIEWS) -> tuple[float, float, float]:
    """(base spatial block, base temporal block, ControlNet pair) bytes per token per D without
    checkpointing; a block the config lacks counts 0."""
    cv = CV_RING if cfg.cross_view == "ring" else 0
    temporal = BLOCK_T if cfg.temporal else 0
    control = BLOCK_S + (cv if cfg.control_cross_view else 0) + (BLOCK_T if cfg.control_temporal else 0) + CN_PAIR
    return BLOCK_S + cv, temporal, control


def bev_frame_bytes(cfg) -> float:
    """Saved activations of the BEV stem per pixel frame (200 x 200 map, 3 stride-2 convs, bf16
    conv outputs kept for SiLU and the next conv; x2 for the fp32/bf16 copies the count shows)."""
    c1, c2, c3 = (tuple(cfg.map_stem) + (0, 0, 0))[:3]
    hw = (100 * 100, 50 * 50, 25 * 25)
    return 2.0 * (8 * 200 * 200 * 2 + 4 * (c1 * hw[0] + c2 * hw[1] + c3 * hw[2]) + 4 * cfg.hidden * hw[2])


def estimate(cfg, params: int, batch: int, height: int, width: int, frames: int, sp: int = 1,
             checkpointing: bool = False, text_len: int = 300, boxes: int = 64, views: int = NUM_VIEWS) -> Estimate:
    """Peak bytes per GPU of one training step of `cfg` (a ModelConfig) on one bucket."""
    tl, S = token_grid(height, width, frames, cfg.patch)
    s_local = math.ceil(S / sp)
    tokens = batch * views * tl * s_local                       # this rank's tokens
    D, K, depth = cfg.hidden, cfg.control_depth, cfg.depth
    spatial, temporal, control = block_coefficient(cfg, views)
    blocks = depth * (1 + cfg.temporal) + K * (1 + cfg.control_temporal)   # blocks the forward runs
    lc = 2 + min(text_len + 1, cfg.text_len) + boxes            # keys: ego pose, camera, text (longest + 1), boxes
    kv_per_block = batch * views * tl * lc * D * 2 * 2          # k and v, bf16, per (view, latent frame)
    replicated = frames * batch * bev_frame_bytes(cfg)
    if checkpointing:
        per_token = CKPT_BLOCK_INPUT * blocks + CKPT_CN_RESIDUAL * K * (1 + cfg.control_temporal) + spatial \
            + BOUNDARY_GRAD + OUTSIDE
        replicated += kv_per_block
    else:
        per_token = (spatial + temporal) * depth + control * K + OUTSIDE
        replicated += kv_per_block * blocks
    return Estimate(static_bytes(params), tokens * D * per_token + replicated, tokens)


def read_buckets(stage: str, full_frames: int) -> list[dict]:
    import yaml
    from pathlib import Path
    rows = yaml.safe_load(Path(stage).read_text())["buckets"]
    out = []
    for b in rows:
        f = b["num_frames"]
        out.append({"height": int(b["height"]), "width": int(b["width"]), "batch": int(b["batch_size"]),
                    "frames": full_frames if f == "full" else int(f), "full": f == "full"})
    return out


def plan(preset: str, stage: str, sps=(1, 2, 4), full_frames: int = 241, budget_gb: float = 72.0) -> list[dict]:
    """One row per bucket: estimated GB per GPU for each (checkpointing, sp), and the least SP
    that fits `budget_gb` (80 GB less 10 % for context and fragmentation) with checkpointing."""
    from model.registry import PRESETS
    cfg = PRESETS[preset]
    params = n_params(preset)
    rows = []
    for b in read_buckets(stage, full_frames):
        row = dict(b, est={})
        for ck in (False, True):
            for sp in sps:
                e = estimate(cfg, params, b["batch"], b["height"], b["width"], b["frames"], sp, ck)
                row["est"][(ck, sp)] = e.total / 1e9
        fits = [sp for sp in sps if row["est"][(True, sp)] <= budget_gb]
        row["min_sp_ckpt"] = fits[0] if fits else None
        row["static_gb"] = static_bytes(params) / 1e9
        rows.append(row)
    return rows


def markdown(rows: list[dict], sps=(1, 2, 4), full_frames: int = 241) -> str:
    head = ("| bucket | batch | " + " | ".join(f"no ckpt SP={s}" for s in sps) + " | "
            + " | ".join(f"ckpt SP={s}" for s in sps) + " | on 80 GB |")
    lines = [head, "|" + "---|" * (3 + 2 * len(sps))]
    for r in rows:
        name = f"{r['height']}x{r['width']} T={'full (' + str(full_frames) + ')' if r['full'] else r['frames']}"
        cells = [f"{r['est'][(ck, s)]:.0f}" for ck in (False, True) for s in sps]
        need = r["min_sp_ckpt"]
        verdict = ("no SP needed" if need == 1 else f"needs SP={need}" if need else "does not fit at SP=4")
        lines.append(f"| {name} | {r['batch']} | " + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(lines)


def measure_saved_bytes(model, x, t, cond, autocast: bool = True) -> int:
    """Bytes of the distinct storages autograd saves in one forward (parameters excluded), on
    the CPU under bf16 autocast: the measurement the coefficients above come from."""
    import torch
    seen: dict[tuple[int, int], int] = {}

    def pack(tensor):
        st = tensor.untyped_storage()
        seen[(st.data_ptr(), st.nbytes())] = st.nbytes()
        return tensor

    params = {(p.untyped_storage().data_ptr(), p.untyped_storage().nbytes()) for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(x, t, cond)
    return sum(v for k, v in seen.items() if k not in params)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.memory", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--stage", default="configs/stages/stage3.yaml")
    ap.add_argument("--full-frames", type=int, default=241, help="frames of a 'full' bucket clip (20 s at 12 Hz)")
    ap.add_argument("--budget-gb", type=float, default=72.0, help="usable GB per GPU (80 GB less headroom)")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args(argv)
    from model.registry import PRESETS
    if a.preset not in PRESETS:
        ap.error(f"unknown preset {a.preset!r}; choose one of {sorted(PRESETS)}")
    try:
        rows = plan(a.preset, a.stage, full_frames=a.full_frames, budget_gb=a.budget_gb)
    except FileNotFoundError as e:
        ap.error(f"stage config not found: {e.filename}")
    print(f"estimated peak GB per GPU, preset {a.preset} ({rows[0]['static_gb']:.1f} GB static: weights, grads, "
          f"AdamW, EMA, bf16 copies), bf16 activations")
    print(markdown(rows, full_frames=a.full_frames))
    return 0


if __name__ == "__main__":
    sys.exit(main())
