"""Forward+backward time of MVDiT presets on one clip (default: CPU, 6 views, 9 frames, 64x128).

Baseline (same run, same clip): the same preset without the MVDiT additions (no cross-view
attention, no BEV ControlNet) = a plain STDiT-3 with our condition encoders. The figure
`<preset>_ratio_vs_stdit` is the cost of multi-view + map control.

    python bench/model.py                                  # tiny and small on CPU
    python bench/model.py --flops --preset paper --height 424 --width 800 --frames 17
                                                           # FLOPs of one step, counted on the meta device
    python bench/model.py --preset paper --device cuda --height 424 --width 800 --frames 17 \
        --bf16 --checkpointing --repeats 3                 # paper step time + peak memory on a GPU
"""
from __future__ import annotations

import argparse
import statistics

import torch

from _common import Timer, save  # noqa: E402  (bench/_common puts the repo root on sys.path)
from model.conditions import random_conditions
from model.registry import PRESETS, build_model, count_parameters


def step_seconds(model, x, t, cond, repeats: int, bf16: bool) -> float:
    times = []
    for i in range(repeats + 1):                           # first call warms up allocators/kernels
        model.zero_grad(set_to_none=True)
        if x.is_cuda:
            torch.cuda.synchronize()
        with Timer() as tm, torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            model(x, t, cond).float().square().mean().backward()
            if x.is_cuda:
                torch.cuda.synchronize()
        if i:
            times.append(tm.seconds)
    return statistics.median(times)


def step_flops(cfg_name: str, overrides: dict, args) -> float:
    """fwd+bwd FLOPs of one clip, counted with FlopCounterMode on meta tensors (no memory, no GPU)."""
    from torch.utils.flop_counter import FlopCounterMode
    from model.mvdit import MVDiT
    from dataclasses import replace
    with torch.device("meta"):
        model = MVDiT(replace(PRESETS[cfg_name], **overrides))
    cond = random_conditions(1, args.views, args.frames, boxes=args.boxes, text_len=args.text_len,
                             text_dim=PRESETS[cfg_name].text_dim).to("meta")
    Tl = (args.frames - 1) // 4 + 1
    x = torch.randn(1, args.views, 16, Tl, args.height // 8, args.width // 8, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        model(x, torch.rand(1, device="meta"), cond).sum().backward()
    return float(counter.get_total_flops())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", action="append", choices=sorted(PRESETS), help="default: tiny and small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--views", type=int, default=6)
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--boxes", type=int, default=32)
    ap.add_argument("--text-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (the CI box has 2 shared cores)")
    ap.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (GPU runs)")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing per block")
    ap.add_argument("--flops", action="store_true", help="count FLOPs on the meta device instead of timing")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.flops:
        figures, parts = {}, []
        for name in args.preset or ["tiny", "small"]:
            full = step_flops(name, {}, args)
            plain = step_flops(name, {"cross_view": "none", "control_depth": 0}, args)
            figures.update({f"{name}_tflop": full / 1e12, f"{name}_stdit_tflop": plain / 1e12,
                            f"{name}_flop_ratio_vs_stdit": full / plain})
            parts.append(f"{name}: {full / 1e12:.2f} TFLOP fwd+bwd ({full / plain:.2f}x plain STDiT)")
        clip = f"{args.views}v x {args.frames}f x {args.height}x{args.width}"
        save("model_flops", figures, f"{clip}: " + "; ".join(parts))
        return 0
    dev = torch.device(args.device)
    figures, parts = {}, []
    for name in args.preset or ["tiny", "small"]:
        cfg = PRESETS[name]
        g = torch.Generator().manual_seed(0)
        cond = random_conditions(1, args.views, args.frames, boxes=args.boxes, text_len=args.text_len,
                                 text_dim=cfg.text_dim, generator=g).to(dev)
        Tl = (args.frames - 1) // 4 + 1
        x = torch.randn(1, args.views, 16, Tl, args.height // 8, args.width // 8, generator=g).to(dev)
        t = torch.rand(1, generator=g).to(dev)
        secs = {}
        for variant, over in (("mvdit", {}), ("stdit", {"cross_view": "none", "control_depth": 0})):
            torch.manual_seed(0)
            model = build_model(name, **over).to(dev)
            model.enable_gradient_checkpointing(args.checkpointing)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            secs[variant] = step_seconds(model, x, t, cond, args.repeats, args.bf16)
            figures[f"{name}_{variant}_params"] = count_parameters(model)
            if dev.type == "cuda":
                figures[f"{name}_{variant}_peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
            del model
        figures[f"{name}_fwd_bwd_s"] = secs["mvdit"]
        figures[f"{name}_stdit_fwd_bwd_s"] = secs["stdit"]
        figures[f"{name}_ratio_vs_stdit"] = secs["mvdit"] / secs["stdit"]
        parts.append(f"{name}: {secs['mvdit']:.3f}s fwd+bwd ({secs['mvdit'] / secs['stdit']:.2f}x plain STDiT)")
    clip = f"{args.views}v x {args.frames}f x {args.height}x{args.width} on {args.device}"
    save("model" if args.device == "cpu" else f"model_{args.device.split(':')[0]}", figures, f"{clip}: " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
