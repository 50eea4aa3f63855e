"""Trainer step time, latent tokens/s and MFU: the full train/train.py step vs the bare model step.

    python bench/train.py [--model tiny] [--height 64 --width 128 --frames 9 --batch-size 2] [--steps 12]

Baseline (same run, same batch shape): forward + backward + AdamW step of the model on one
batch held in memory. Figure: the trainer's own step (stream + decode + text lookup +
condition drop + flow loss + clip + EMA + JSONL log) from its log. The ratio trainer/bare is
the trainer's overhead. FLOPs per step follow train.train.step_flops (6 N per latent token
plus self-attention); MFU is reported on a GPU (bf16 peak from train.train.PEAK_TFLOPS) and
left out on a CPU, where only achieved GFLOP/s is meaningful.

`--world 2` (default; 0 skips) adds the multi-process trainer on the same data: torchrun with
FSDP2 (sharded state, the default) and with DDP, one thread per process, the stage batch per
data-parallel rank: step time and samples/s against the one-process trainer's, and the sizes
of a checkpoint (the sharded state per rank, and the single-file export) at world 1 and 2.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import save  # noqa: E402


def run_figures(run: Path) -> dict:
    """Median step time and samples/s of a run's log (first two steps left out), its checkpoint's sizes."""
    from train import checkpoint as ckpt
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    c = ckpt.resolve(run)
    shards = sorted((c / ckpt.SHARDED).glob("*.safetensors"))
    return {"step_s": statistics.median(r["step_s"] for r in log[2:]),
            "samples_per_s": statistics.median(r["samples_per_s"] for r in log[2:]),
            "sharded_bytes": sum(f.stat().st_size for f in shards), "sharded_files": len(shards),
            "sharded_bytes_per_file": [f.stat().st_size for f in shards],
            "export_bytes": sum((c / n).stat().st_size for n in ("model.safetensors", "ema.safetensors"))}


def torchrun_figures(cfg, out: Path, sharding: str, world: int) -> dict:
    import os
    import subprocess
    repo = Path(__file__).resolve().parents[1]
    args = ["--no-progress", "--out", str(out), "--steps", str(cfg.steps), "--data-root", cfg.data.root,
            "--stage", cfg.data.stage, "--text-cache", cfg.data.text_cache, "--model", cfg.model,
            "--set", f"sharding={sharding}", "--set", "val_every=0", "--set", f"warmup={cfg.warmup}",
            "--set", f"ckpt_every={cfg.ckpt_every}", "--set", f"log_every={cfg.log_every}",
            "--set", f"data.samples_per_chunk={cfg.data.samples_per_chunk}",
            "--set", f"data.shuffle_buffer={cfg.data.shuffle_buffer}",
            "--set", f"data.text_max_length={cfg.data.text_max_length}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                        "--master_addr", "127.0.0.1", "--master_port", str(29500 + os.getpid() % 1000),
                        "-m", "train.train", *args], cwd=repo, env=env, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"torchrun ({sharding}) failed:\n{r.stderr[-2000:]}")
    return run_figures(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--world", type=int, default=2, help="processes of the multi-process runs (0: skip them)")
    a = ap.parse_args(argv)

    import torch
    torch.set_num_threads(a.threads)
    from model.text import T5TextEncoder, TextEmbeddingCache, read_captions, write_tiny_t5
    from tests.factories import write_shards
    from train.config import DataConfig, TrainConfig
    from train.data import BatchStream, find_shards
    from train.train import (TextSource, build_model, compute_loss, make_optimizer, peak_tflops, setup_distributed,
                             step_flops, step_rng, train)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_shards(root / "shards", {(a.height, a.width, a.frames): 8}, per_shard=4)
        (root / "stage.yaml").write_text(f"name: bench\nbuckets:\n  - {{height: {a.height}, width: {a.width}, "
                                         f"num_frames: {a.frames}, batch_size: {a.batch_size}}}\n")
        cfg0 = TrainConfig(model=a.model)
        from model.registry import PRESETS
        text_dim = PRESETS[a.model].text_dim
        write_tiny_t5(root / "t5", d_model=text_dim, num_heads=4 if text_dim <= 64 else 8)
        TextEmbeddingCache(root / "cache").build(read_captions(str(root / "shards")),
                                                 T5TextEncoder(root / "t5", max_length=32), progress=False)
        cfg = TrainConfig(out=str(root / "run"), model=a.model, steps=a.steps, warmup=1, val_every=0,
                          ckpt_every=10**9, log_every=10**9,
                          data=DataConfig(root=str(root / "shards"), stage=str(root / "stage.yaml"),
                                          samples_per_chunk=8, shuffle_buffer=4, text_cache=str(root / "cache"),
                                          text_max_length=32))
        del cfg0
        _, _, device = setup_distributed(cfg.device)
        autocast = device.type == "cuda"

        # baseline: the bare model step on one in-memory batch
        model = build_model(cfg)
        model.to(device).train()
        opt = make_optimizer(cfg, model)
        batch = next(iter(BatchStream(find_shards(cfg.data, "train", []), cfg.data, seed=0, stop_step=1)))
        text = TextSource(cfg.data.text_cache, None, 32)
        times = []
        for i in range(a.steps):
            t0 = time.perf_counter()
            loss = compute_loss(model, batch, text, cfg, step_rng(0, i, 0), device, autocast)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        bare = statistics.median(times[2:])
        n_params = sum(p.numel() for p in model.parameters())
        flops = step_flops(model.config, n_params, batch.latent_shape)
        del model, opt

        # figure: the trainer's step
        train(cfg, progress=False)
        log = [json.loads(line) for line in (root / "run" / "log.jsonl").read_text().splitlines()]
        full = statistics.median(r["step_s"] for r in log[2:])
        tokens = log[-1]["latent_tokens_per_s"] * log[-1]["step_s"]
        multi = {"world1": run_figures(root / "run")}
        for sharding in (("fsdp", "ddp") if a.world > 1 else ()):
            multi[f"{sharding}_world{a.world}"] = torchrun_figures(cfg, root / sharding, sharding, a.world)
    peak = peak_tflops(cfg, device)
    figures = {"model": a.model, "params": n_params, "bucket": f"{a.height}x{a.width}_t{a.frames}",
               "batch_size": a.batch_size, "device": str(device), "threads": a.threads,
               "bare_step_s": bare, "trainer_step_s": full, "overhead_ratio": full / bare,
               "latent_tokens_per_step": tokens, "latent_tokens_per_s": tokens / full,
               "flops_per_step": flops, "achieved_GFLOPps": flops / full / 1e9}
    if peak:
        figures["mfu"] = flops / full / (peak * 1e12)
    figures["processes"] = multi
    one = multi["world1"]
    for k, v in multi.items():
        v["step_s_vs_world1"] = v["step_s"] / one["step_s"]
        v["samples_per_s_vs_world1"] = v["samples_per_s"] / one["samples_per_s"]
    summary_multi = "; ".join(f"{k}: {v['step_s'] * 1e3:.0f} ms/step (x{v['step_s_vs_world1']:.2f}), "
                              f"{v['samples_per_s_vs_world1']:.2f}x samples/s, ckpt sharded "
                              f"{v['sharded_bytes'] / 1e6:.1f} MB ({v['sharded_files']} files) + export "
                              f"{v['export_bytes'] / 1e6:.1f} MB" for k, v in multi.items())
    summary = (f"{a.model} {figures['bucket']} bs{a.batch_size} on {device}: trainer step {full * 1e3:.0f} ms vs bare "
               f"model step {bare * 1e3:.0f} ms (x{full / bare:.2f}), {tokens / full:.0f} latent tokens/s, "
               f"{flops / full / 1e9:.1f} GFLOP/s" + (f", MFU {figures['mfu']:.1%}" if peak else "")
               + f" | {summary_multi}")
    save("train", figures, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
