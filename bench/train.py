"""Trainer step time, latent tokens/s and MFU: the full train/train.py step vs the bare model step.

    python bench/train.py [--model tiny] [--height 64 --width 128 --frames 9 --batch-size 2] [--steps 12]

Baseline (same run, same batch shape): forward + backward + AdamW step of the model on one
batch held in memory. Figure: the trainer's own step (stream + decode + text lookup +
condition drop + flow loss + clip + EMA + JSONL log) from its log. The ratio trainer/bare is
the trainer's overhead. FLOPs per step follow train.train.step_flops (6 N per latent token
plus self-attention); MFU is reported on a GPU (bf16 peak from train.train.PEAK_TFLOPS) and
left out on a CPU, where only achieved GFLOP/s is meaningful.
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)

    import torch
    torch.set_num_threads(a.threads)
    from model.text import T5TextEncoder, TextEmbeddingCache, read_captions, write_tiny_t5
    from tests.factories import write_shards
    from train.config import DataConfig, TrainConfig
    from train.data import BatchStream, find_shards
    from train.train import (TextSource, build_model, compute_loss, make_optimizer, peak_tflops, setup_distributed,
                             step_flops, step_generator, train)

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
        model, _ = build_model(cfg)
        model.to(device).train()
        opt = make_optimizer(cfg, model)
        batch = next(iter(BatchStream(find_shards(cfg.data, "train", []), cfg.data, seed=0, stop_step=1)))
        text = TextSource(cfg.data.text_cache, None, 32)
        times = []
        for i in range(a.steps):
            t0 = time.perf_counter()
            loss = compute_loss(model, batch, text, cfg, step_generator(0, i, 0), device, autocast)
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
    peak = peak_tflops(cfg, device)
    figures = {"model": a.model, "params": n_params, "bucket": f"{a.height}x{a.width}_t{a.frames}",
               "batch_size": a.batch_size, "device": str(device), "threads": a.threads,
               "bare_step_s": bare, "trainer_step_s": full, "overhead_ratio": full / bare,
               "latent_tokens_per_step": tokens, "latent_tokens_per_s": tokens / full,
               "flops_per_step": flops, "achieved_GFLOPps": flops / full / 1e9}
    if peak:
        figures["mfu"] = flops / full / (peak * 1e12)
    summary = (f"{a.model} {figures['bucket']} bs{a.batch_size} on {device}: trainer step {full * 1e3:.0f} ms vs bare "
               f"model step {bare * 1e3:.0f} ms (x{full / bare:.2f}), {tokens / full:.0f} latent tokens/s, "
               f"{flops / full / 1e9:.1f} GFLOP/s" + (f", MFU {figures['mfu']:.1%}" if peak else ""))
    save("train", figures, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
