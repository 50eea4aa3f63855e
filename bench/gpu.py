"""The GPU check (issue 13 part 8): one CUDA device, under 8 minutes, nothing downloaded.

    python bench/gpu.py              # full check (~3-6 min on an H100)
    python bench/gpu.py --quick      # one repeat each, small preset and the paper preset's first shape
    python bench/gpu.py --peak-tflops 756   # override the device's dense bf16 peak (e.g. H100 PCIe)

(a) CogVAE encode of one 6-view 17 x 424 x 800 clip with the real CogVideoX-2b VAE
    architecture (diffusers `AutoencoderKLCogVideoX()` defaults are the 2b VAE) and random
    weights, bf16, set up as pipeline/shards/encode.py's `load_vae` does (frame batch 8, one view at a
    time), tiling off and on. Baseline: the FLOP floor = pixel-frames x 9.3 MFLOP / peak; the
    figure `vae_*_floor_fraction` is floor time / measured time.
(d) CogVAE decode of one 848 x 1600 T=17 view (the eval protocol's clip; mdv2-sample / mdv2-generate
    decode view by view) with the CogVideoX-2b VAE architecture, bf16, set up as train/vaedecode.py
    does (240x360 tiles, overlap 1/5, slicing), tiling on and off: seconds and peak memory
    (docs/train.md: the tiled decode should stay well under 40 GB; the authors measured 51-58 GB untiled).
(b) Trainer steps (bf16 autocast, rectified-flow loss, AdamW, grad clip, fp32 EMA: the step of
    train/train.py on a batch held in memory) of the `small` and `paper` presets on a
    224x400 T=17 and a 424x800 T=9 batch, gradient checkpointing off and on: step time, peak
    memory (torch.cuda.max_memory_allocated, next to model/memory.py's estimate for the same
    step), MFU = FLOPs counted by torch's FlopCounterMode on the meta device / step time / peak.

(c) The sharded step of the `paper` preset as train/configs/stage3.yaml builds it (FSDP2 on a
    one-rank mesh: bf16 compute weights from fp32 masters, fp32 gradient reduction, gradient
    checkpointing, the recipe's AdamW / clipping / EMA / CFG drops) on 424x800 T=33 and
    848x1600 T=17 at `--batch-size` (default 1): step time, peak memory and MFU, with the memory
    plan's predicted peak for the same step beside the measured one (`plan_over_measured`).
    `python bench/gpu.py --skip-vae --skip-steps` runs (c) alone.

Each measurement runs in its own try/except: an error (out of memory included) is recorded
in the JSON under its key and the check goes on. Writes bench/results/gpu.json. On a machine
without a CUDA GPU it says so and exits 0 without writing anything. `--smoke` runs every code
path on the CPU with the tiny VAE and the tiny preset at small sizes (bench/results/gpu_smoke.json):
the test suite does, so the GPU run finds no Python error.
"""
from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")            # nothing is downloaded: every model is built in code
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import save  # noqa: E402

# dense bf16 peak TFLOP/s by device name; first match wins (so "H100 PCIe" before "H100", "A100" before "A10")
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0),
                    ("H20", 148.0), ("GH200", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0),
                    ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("4090", 165.0), ("A10", 125.0))
VAE_MFLOP_PER_PIXEL_FRAME = 9.3      # real CogVideoX-2b encoder (bench/encode.py counts 9.26)
CLIP = dict(views=6, frames=17, height=424, width=800)
SHAPES = (("224x400_t17", 224, 400, 17), ("424x800_t9", 424, 800, 9))
PRESETS = ("small", "paper")
# (c) the sharded step (FSDP2, checkpointing on) of the paper preset as stage 3 builds it, at one GPU
SHARDED_SHAPES = (("424x800_t33", 424, 800, 33), ("848x1600_t17", 848, 1600, 17))
SHARDED_PRESET = "paper"
DEVICE = "cuda"
DECODE_VIEW = dict(frames=17, height=848, width=1600)
# --smoke: the same code on the CPU, small enough for the test suite
SMOKE_CLIP = dict(views=2, frames=9, height=32, width=48)
SMOKE_DECODE_VIEW = dict(frames=9, height=64, width=96)
SMOKE_SHAPES = (("32x64_t9", 32, 64, 9),)
SMOKE_SHARDED_SHAPES = (("32x64_t9", 32, 64, 9),)


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAK_BF16_TFLOPS if k in name), None)


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _error(e: BaseException) -> dict:
    return {"error": f"{type(e).__name__}: {e}"[:500], "where": traceback.format_exc(limit=-3)[-800:]}


def _cuda() -> bool:
    return DEVICE == "cuda"


def _sync() -> None:
    import torch
    if _cuda():
        torch.cuda.synchronize()


def _free() -> None:
    import torch
    gc.collect()
    if _cuda():
        torch.cuda.empty_cache()


def _reset_peak() -> None:
    import torch
    if _cuda():
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    import torch
    return torch.cuda.max_memory_allocated() / 2 ** 30 if _cuda() else None


def _timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return times


# ---- (a) CogVAE encode --------------------------------------------------------------------

def bench_vae(tiling: bool, repeats: int, peak: float | None) -> dict:
    import torch
    from diffusers import AutoencoderKLCogVideoX
    from pipeline.shards.encode import EncodeConfig
    from pipeline.shards.vae import TINY_VAE_CONFIG
    ec = EncodeConfig(vae="(built in code)", device=DEVICE, tiling=tiling)
    if not _cuda():   # smoke: tiles that fit the small clip
        ec.tile_height, ec.tile_width = 20, 30
    torch.manual_seed(0)
    # CogVideoX-2b VAE architecture (the diffusers defaults), random weights; smoke: the tiny one
    vae = AutoencoderKLCogVideoX() if _cuda() else AutoencoderKLCogVideoX(**TINY_VAE_CONFIG)
    vae = vae.to(DEVICE, torch.bfloat16 if _cuda() else torch.float32).eval().requires_grad_(False)
    vae.num_sample_frames_batch_size = ec.frame_batch       # as pipeline/shards/encode.py load_vae
    if tiling:
        vae.enable_tiling(tile_sample_min_height=ec.tile_height, tile_sample_min_width=ec.tile_width,
                          tile_overlap_factor_height=ec.tile_overlap, tile_overlap_factor_width=ec.tile_overlap)
    vae.enable_slicing()
    V, T, H, W = CLIP["views"], CLIP["frames"], CLIP["height"], CLIP["width"]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = (torch.rand(V, 3, T, H, W, device=DEVICE, generator=g) * 2 - 1).to(vae.dtype)   # (V, 3, T, H, W)
    _reset_peak()
    with torch.inference_mode():
        vae.encode(x[:1])                                                                    # warm-up, one view
        res: dict = {}
        times = _timed(lambda: res.update(lat=vae.encode(x).latent_dist.mean), repeats)
        lat = res["lat"]                                                                     # (V, 16, T', H/8, W/8)
    sec = min(times)
    floor = V * T * H * W * VAE_MFLOP_PER_PIXEL_FRAME * 1e6 / (peak * 1e12) if peak else None
    out = {"seconds": sec, "seconds_all": times, "clip_fps": V * T / sec, "latent_shape": list(lat.shape),
           "peak_mem_gib": _peak_gib(), "flop_floor_seconds": floor, "floor_fraction": floor / sec if floor else None}
    del vae, x, lat
    return out


# ---- (d) CogVAE decode of one view ----------------------------------------------------------

def bench_decode(tiling: bool, repeats: int) -> dict:
    import torch
    from diffusers import AutoencoderKLCogVideoX
    from pipeline.shards.vae import TINY_VAE_CONFIG
    from train.vaedecode import DecodeConfig, decode_view, setup_decoder
    shape = DECODE_VIEW if _cuda() else SMOKE_DECODE_VIEW
    dc = DecodeConfig(tiling=tiling) if _cuda() else DecodeConfig(tiling, tile_height=32, tile_width=64,
                                                                   tile_overlap=0.25)
    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX() if _cuda() else AutoencoderKLCogVideoX(**TINY_VAE_CONFIG)
    vae = setup_decoder(vae.to(DEVICE, torch.bfloat16 if _cuda() else torch.float32).eval().requires_grad_(False), dc)
    t, h, w = shape["frames"], shape["height"], shape["width"]
    lat = torch.randn(16, (t - 1) // 4 + 1, h // 8, w // 8, generator=torch.Generator().manual_seed(0))
    res: dict = {}
    _reset_peak()
    with torch.inference_mode():
        times = _timed(lambda: res.update(frames=decode_view(vae, lat, 1.0)), repeats)
    out = {"seconds": min(times), "peak_mem_gib": _peak_gib(), "tiling": tiling,
           "tile": [dc.tile_height, dc.tile_width, dc.tile_overlap], "frames_shape": list(res["frames"].shape)}
    del vae, res
    return out


# ---- (b) trainer steps ----------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def count_flops(preset: str, batch: int, height: int, width: int, frames: int, text_len: int, boxes: int,
                overrides: tuple = ()) -> float:
    """fwd + bwd FLOPs of one step, counted on the meta device (no memory)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from model.conditions import random_conditions
    from model.registry import build_model
    with torch.device("meta"):
        model = build_model(preset, **dict(overrides))
    cfg = model.config
    cond = random_conditions(batch, CLIP["views"], frames, boxes=boxes, text_len=text_len, text_dim=cfg.text_dim,
                             bev_size=200).to("meta")
    x = torch.zeros(batch, CLIP["views"], cfg.in_channels, (frames - 1) // 4 + 1, height // 8, width // 8,
                    device="meta")
    with FlopCounterMode(display=False) as fc:
        model(x, torch.zeros(batch, device="meta"), cond).sum().backward()
    return float(fc.get_total_flops())


def one_rank_topology():
    """A world of one process with its FSDP mesh: the trainer's sharded code path on one GPU."""
    import socket
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from train.distributed import Topology
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("nccl" if _cuda() else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=1)
    return Topology(0, 1, 1, shard_mesh=init_device_mesh(DEVICE, (1,), mesh_dim_names=("dp_sp",)))


class Trainer:
    """One preset on the GPU with its AdamW and fp32 EMA, as train/train.py holds them: whole
    (one process; bf16 autocast over fp32 weights) or `sharded` (FSDP2 on a one-rank mesh: bf16
    compute weights gathered from fp32 masters, fp32 gradient reduction, as every rank of a run)."""

    def __init__(self, preset: str, overrides: dict | None = None, sharded: bool = False):
        import torch
        from model.registry import build_model
        from train import sharding
        from train.config import TrainConfig
        from train.train import make_optimizer
        self.preset, self.overrides, self.sharded = preset, dict(overrides or {}), sharded
        self.cfg = TrainConfig(model=preset)                 # the recipe's AdamW, clipping, EMA and drops
        torch.manual_seed(0)
        try:
            with torch.device(DEVICE):                      # initialised on the GPU: seconds, not minutes
                self.model = build_model(preset, **self.overrides).train()
        except Exception:  # noqa: BLE001  (any surprise of on-device init: the slow, sure path)
            self.model = build_model(preset, **self.overrides).to(DEVICE).train()
        self.n_params = sum(p.numel() for p in self.model.parameters())
        if sharded:
            sharding.shard_fsdp(self.model, one_rank_topology(), bf16=_cuda())
        self.ema = sharding.EMA(self.model)
        self.opt = make_optimizer(self.cfg, self.model)

    def step_fn(self, batch: int, height: int, width: int, frames: int, text_len: int, boxes: int):
        import torch
        from model.conditions import random_conditions
        from train import flow, sharding
        from train.train import condition_drops
        cfg, mcfg = self.cfg, self.model.config
        g = torch.Generator().manual_seed(0)
        cond = random_conditions(batch, CLIP["views"], frames, boxes=boxes, text_len=text_len,
                                 text_dim=mcfg.text_dim, generator=g).to(DEVICE)
        x0 = torch.randn(batch, CLIP["views"], mcfg.in_channels, (frames - 1) // 4 + 1, height // 8, width // 8,
                         generator=g).to(DEVICE)                                    # (B, V, 16, T', H', W')
        noise = torch.randn(x0.shape, generator=g).to(DEVICE)
        shift = flow.shift_factor(cfg.flow, height, width, x0.shape[3])
        t = flow.sample_timesteps(batch, cfg.flow, shift, g).to(DEVICE)
        drop_cond, drop_frames = (d.to(DEVICE) for d in condition_drops(batch, frames, cfg.flow, g))
        xt = flow.interpolate(x0, noise, t)

        def step():
            with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=_cuda()):
                pred = self.model(xt, t, cond, drop_cond=drop_cond, drop_frames=drop_frames)
            loss = flow.flow_loss(pred, x0, noise)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            sharding.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.opt.step()
            self.ema.update(self.model, cfg.ema_decay)
            return loss
        return step


def planned_peak_gb(tr: Trainer, batch: int, h: int, w: int, f: int, checkpointing: bool, text_len: int,
                    boxes: int) -> float:
    """model/memory.py's estimate for this very step (the stored coefficients, else measured now)."""
    from model import memory
    facts = memory.model_facts(tr.preset, tr.overrides)
    try:
        coef = memory.coefficients(tr.preset, tr.overrides, text_len, boxes, memory.bev_cells(h), facts)
    except memory.Uncalibrated:
        coef = memory.calibrate(tr.preset, tr.overrides, text_len, boxes, memory.bev_cells(h))
    e = memory.estimate(coef, facts, batch, h, w, f, 1, 1, checkpointing, "fsdp" if tr.sharded else "none",
                        views=CLIP["views"])
    return e.total / 1e9


def bench_steps(tr: Trainer, shape, checkpointing: bool, batch: int, repeats: int, peak: float | None,
                text_len: int, boxes: int) -> dict:
    import torch
    from train.train import step_flops
    _, h, w, f = shape
    text_len = min(text_len, tr.model.config.text_len)  # a caption never exceeds the null caption (tiny: 64)
    est = planned_peak_gb(tr, batch, h, w, f, checkpointing, text_len, boxes)
    tr.model.enable_gradient_checkpointing(checkpointing)
    try:
        step = tr.step_fn(batch, h, w, f, text_len, boxes)
        _reset_peak()
        step()                                                  # warm-up (allocates the AdamW states)
        times = _timed(step, repeats)
    except torch.OutOfMemoryError as e:
        tr.opt.zero_grad(set_to_none=True)
        return {**_error(e), "estimated_peak_gb": est}
    sec = statistics.median(times)
    flops = count_flops(tr.preset, batch, h, w, f, text_len, boxes, tuple(sorted(tr.overrides.items())))
    lat = (batch, CLIP["views"], 16, (f - 1) // 4 + 1, h // 8, w // 8)
    peak_gib = _peak_gib()
    measured = peak_gib * 2 ** 30 / 1e9 if peak_gib is not None else None
    out = {"step_s": sec, "step_s_all": times, "peak_mem_gib": peak_gib, "estimated_peak_gb": est,
           "measured_peak_gb": measured, "plan_over_measured": est / measured if measured else None,
           "sharded": tr.sharded, "params": tr.n_params, "batch": batch, "tflop_per_step": flops / 1e12,
           "tflop_per_step_analytic": step_flops(tr.model.config, tr.n_params, lat) / 1e12,
           "achieved_tflops": flops / sec / 1e12}
    if peak:
        out["mfu"] = flops / sec / (peak * 1e12)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one timed repeat each; paper preset on 224x400 T=17 only")
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the device (default: from its name)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (default 3; --quick: 1)")
    ap.add_argument("--batch-size", type=int, default=1, help="clips per trainer step")
    ap.add_argument("--text-len", type=int, default=300, help="T5 tokens (paper: 300)")
    ap.add_argument("--boxes", type=int, default=64, help="box tracks per clip")
    ap.add_argument("--skip-vae", action="store_true")
    ap.add_argument("--skip-steps", action="store_true", help="skip (b), the unsharded steps")
    ap.add_argument("--skip-sharded", action="store_true", help="skip (c), the sharded (FSDP2) paper steps")
    ap.add_argument("--smoke", action="store_true", help="every code path on the CPU at tiny sizes (tests)")
    a = ap.parse_args(argv)
    import torch
    global DEVICE, CLIP, SHAPES, PRESETS, SHARDED_SHAPES, SHARDED_PRESET
    if a.smoke:
        DEVICE, CLIP, SHAPES, PRESETS = "cpu", SMOKE_CLIP, SMOKE_SHAPES, ("tiny",)
        SHARDED_SHAPES, SHARDED_PRESET = SMOKE_SHARDED_SHAPES, "tiny"
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing measured, "
              "nothing written. Run it on a machine with an NVIDIA GPU.")
        return 0
    t_start = time.perf_counter()
    repeats = 1 if a.quick else a.repeats
    name = torch.cuda.get_device_name(0) if _cuda() else "cpu (smoke)"
    peak = peak_tflops(name, a.peak_tflops)
    figures: dict = {"device": name, "peak_bf16_tflops": peak, "quick": a.quick,
                     "gpu_mem_gib": torch.cuda.get_device_properties(0).total_memory / 2 ** 30 if _cuda() else None,
                     "clip": CLIP}
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    def run(key: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            figures[key] = fn()
        except BaseException as e:  # noqa: BLE001  (OOM, missing kernels, ...: record and go on)
            if isinstance(e, KeyboardInterrupt):
                raise
            figures[key] = _error(e)
        figures[key]["wall_s"] = time.perf_counter() - t0
        _free()
        print(f"  {key}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in figures[key].items() if not isinstance(v, (list, dict))
                                       and k != "where"), flush=True)

    if not a.skip_vae:
        for tiling in (False, True):
            run(f"vae_encode_tiling_{'on' if tiling else 'off'}",
                lambda tiling=tiling: bench_vae(tiling, repeats, peak))
        for tiling in (True, False):   # tiled first: the figure that matters survives an untiled OOM
            run(f"vae_decode_view_tiling_{'on' if tiling else 'off'}", lambda tiling=tiling: bench_decode(tiling, 1))
    if not a.skip_steps:
        for preset in PRESETS:
            shapes = SHAPES[:1] if (a.quick and preset == "paper") else SHAPES
            holder: dict = {}
            run(f"{preset}_build", lambda: (holder.update(tr=Trainer(preset)), {"params": holder["tr"].n_params})[1])
            if "tr" not in holder:
                continue
            for shape in shapes:
                for ck in (False, True):
                    run(f"{preset}_{shape[0]}_ckpt_{'on' if ck else 'off'}",
                        lambda shape=shape, ck=ck: bench_steps(holder["tr"], shape, ck, a.batch_size, repeats, peak,
                                                               a.text_len, a.boxes))
            holder.clear()
            _free()
    if not a.skip_sharded:
        from model import memory
        overrides = memory.read_stage("3")["overrides"] if SHARDED_PRESET == "paper" else {}
        holder = {}
        run(f"sharded_{SHARDED_PRESET}_build", lambda: (holder.update(tr=Trainer(SHARDED_PRESET, overrides, True)),
                                                         {"params": holder["tr"].n_params})[1])
        if "tr" in holder:
            for shape in SHARDED_SHAPES:
                run(f"sharded_{SHARDED_PRESET}_{shape[0]}_ckpt_on",
                    lambda shape=shape: bench_steps(holder["tr"], shape, True, a.batch_size, repeats, peak,
                                                    a.text_len, a.boxes))
        holder.clear()
        _free()
    figures["total_wall_s"] = time.perf_counter() - t_start
    parts = []
    for k in ("vae_encode_tiling_off", "vae_encode_tiling_on", *(f"{p}_{s[0]}_ckpt_on" for p in PRESETS[-1:]
                                                                    for s in SHAPES),
              *(f"sharded_{SHARDED_PRESET}_{s[0]}_ckpt_on" for s in SHARDED_SHAPES)):
        v = figures.get(k, {})
        if "error" in v:
            parts.append(f"{k}: {v['error'][:80]}")
        elif "seconds" in v:
            parts.append(f"{k} {v['seconds']:.2f}s/clip ({_num(v['floor_fraction'])} of the FLOP floor)")
        elif "step_s" in v:
            parts.append(f"{k}: {v['step_s']:.2f}s/step, {_num(v['peak_mem_gib'])} GiB (plan "
                         f"{_num(v['estimated_peak_gb'])} GB), MFU {_num(v.get('mfu'))}")
    save("gpu_smoke" if a.smoke else "gpu", figures, f"{name}: " + "; ".join(parts) + f" (total {figures['total_wall_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
