"""The lean trainer: MVDiT + rectified flow on bucketed webdataset shards.

    python -m train.train --config demo --set data.root=demo_out/shards --out runs/demo     # train/configs/demo.yaml
    torchrun --nproc_per_node 8 -m train.train --config stage2 ... --out runs/stage2  # FSDP2 (NCCL on GPUs)
    python -m train.train --out runs/demo --resume                                # continue exactly

One step: the schedule picks this step's bucket (train/buckets.py), the stream gives a
batch of it (train/data.py), the classifier-free-guidance drops are drawn (all conditions
of a sample together, or boxes and trajectory of some frames: `condition_drops`), t is drawn
logit-normal + shifted, the model predicts the velocity of x_t and the MSE is minimised
(train/flow.py; train/loss.py: every draw per sample, so `grad_accum` micro-batches make the
same step as one batch). AdamW at a constant LR after a linear warm-up, gradient clipping, an fp32
EMA of the weights. On several processes the training state is sharded (FSDP2) or
replicated (DDP): train/sharding.py. Every random draw of step s on data-parallel rank r
comes from a generator seeded with (seed, s, r), and the data order is a function of
(seed, step), so training N steps and resuming N more gives the same weights as training 2N.

The shape of `train()`: setup (process groups, run folder, shards, model, sharding, EMA,
optimizer, resume) -> `for step: grad_accum micro-batches; update; log (log.jsonl, OUT/tb/:
train/tblog.py); maybe validate, sample (train/livesample.py), save` -> summary.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline.contract import cli
from train import checkpoint as ckpt
from train import sharding, signals, tblog, watchdog
from train.config import TrainConfig, config_json, load_config
from train.loss import StepRNG, compute_loss, condition_drops, seed_step, step_generator, step_rng  # noqa: F401 (re-exported)
from train.data import Batch, BatchStream, ShardSet, find_shards, make_loader, total_stats
from train.distributed import check_sp, make_topology, setup_distributed
from train.textsource import TextSource  # noqa: F401  (train.train.TextSource: the sampler's import)

log = logging.getLogger("train")

# bf16 dense peak TFLOP/s by GPU name, for the MFU estimate (override with peak_tflops)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
               "4090": 165.0, "A10": 125.0}


# ---- small pure pieces (the tests call these) -----------------------------------------

def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over cfg.warmup steps, then constant (paper Appendix E). `step` counts from
    the start of the stage: an --init-from run starts at step 0, so every stage gets the warm-up
    of its own config (and --resume continues the stage's count)."""
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))


def latent_tokens(model_cfg, latents_shape) -> int:
    b, v, _, tl, h, w = latents_shape
    p = model_cfg.patch
    return b * v * tl * math.ceil(h / p) * math.ceil(w / p)


def step_flops(model_cfg, n_params: int, latents_shape) -> float:
    """Training FLOPs of one step: 6 N per token (fwd + bwd of the linears) plus self-attention
    (spatial over S tokens, temporal over T' frames) in backbone and ControlNet blocks.
    Cross-view and cross-attention are left out, so this slightly under-counts."""
    b, v, _, tl, h, w = latents_shape
    p, d = model_cfg.patch, model_cfg.hidden
    s = math.ceil(h / p) * math.ceil(w / p)
    pairs = model_cfg.depth + model_cfg.control_depth
    attn = 12 * d * pairs * (b * v * tl * s * s + b * v * s * tl * tl)
    return 6.0 * n_params * b * v * tl * s + attn


# ---- setup --------------------------------------------------------------------------

def build_model(cfg: TrainConfig, state_from: str | None = None, report=None) -> torch.nn.Module:
    """The model: the architecture of a checkpoint being resumed (`state_from`; its weights come
    with the rest of the training state, ckpt.load_training_state), else the config's preset,
    initialised from the previous stage (cfg.init_from) if set."""
    from model.registry import build_from_config, build_model as build_preset
    torch.manual_seed(cfg.seed)  # identical init on every rank
    if state_from:
        return build_from_config(ckpt.load_config(state_from)["model"])
    model = build_preset(cfg.model, **cfg.model_overrides)
    if cfg.init_from:
        from model.config import ModelConfig
        from model.stages import init_from_state
        src = ckpt.resolve(cfg.init_from)
        rep = init_from_state(model, ckpt.load_weights(src, cfg.init_weights),
                              ModelConfig.from_dict(ckpt.load_config(src)["model"]), cfg.init_allow_drop,
                              where=f"--init-from {src}")
        if report is not None:
            report(f"init-from {src} ({cfg.init_weights} weights): {rep.summary()}")
    return model


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    kw = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, **kw)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, **kw)
    raise cli.BadInput(f"optimizer {cfg.optimizer!r}: use 'adam' or 'adamw'")


def peak_tflops(cfg: TrainConfig, device: torch.device) -> float | None:
    if cfg.peak_tflops:
        return cfg.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """bf16 compute: `auto` on a GPU, or asked for (`bf16`, also on the CPU)."""
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


# ---- validation -----------------------------------------------------------------------

class Validator:
    """A fixed set of val batches with fixed noise: the val loss is comparable across steps."""

    def __init__(self, cfg: TrainConfig, shards: ShardSet):
        data = copy.deepcopy(cfg.data)
        data.num_workers = 0
        self.batches = list(BatchStream(shards, data, seed=cfg.seed + 1, stop_step=cfg.val_batches))
        self.cfg = cfg

    @torch.no_grad()
    def __call__(self, model, text: TextSource, device, autocast: bool) -> dict:
        was = model.training
        model.eval()
        per: dict[str, list[float]] = {}
        for i, batch in enumerate(self.batches):
            rng = step_rng(self.cfg.seed, 10**9 + i, 0)
            loss = compute_loss(model, batch, text, self.cfg, rng, device, autocast, drops=False)
            per.setdefault(batch.bucket, []).append(float(loss))
        model.train(was)
        allv = [v for vs in per.values() for v in vs]
        return {"val_loss": float(np.mean(allv)), "val_loss_by_bucket": {k: float(np.mean(v)) for k, v in per.items()}}


# ---- the loop -------------------------------------------------------------------------

def train(cfg: TrainConfig, resume: str | None = None, progress: bool = True, overwrite: bool = False,
          stop: signals.GracefulStop | None = None) -> dict:
    # -- setup: processes, run folder, data, model, sharding, EMA, optimizer, resumed state
    rank, world, device = setup_distributed(cfg.device)
    topo = make_topology(rank, world, cfg.sp)     # world = dp x sp; an SP group shares one batch
    bf16 = use_bf16(cfg, device)
    out = Path(cfg.out)
    ckpt.claim_run_dir(out, resume is not None, overwrite, rank, cfg.init_from)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    # the shards first: a wrong --data-root or an old schema is a one-line error before any model is built
    shards = find_shards(cfg.data, cfg.data.split, cfg.data.shards)
    say = (lambda m: print(f"train: {m}", file=sys.stderr)) if rank == 0 else (lambda m: None)
    use_tb = tblog.check(cfg.tensorboard, say)   # every rank: `tensorboard: true` without the package stops them all
    ga = cfg.grad_accum
    model = build_model(cfg, resume, report=say)
    if cfg.grad_checkpointing:
        model.enable_gradient_checkpointing()
    model.to(device).train()
    text = TextSource(cfg.data.text_cache, cfg.data.text_encoder, cfg.data.text_max_length)
    if not resume and not cfg.init_from:  # from scratch: class tokens and base_token from T5 (the authors'
        from model.text import prepare_text_embeddings  # prepare_text_embedding), before the EMA copies them
        prepare_text_embeddings(model, text.embed)
    if topo.sp > 1:
        from model.parallel import enable_sequence_parallel
        enable_sequence_parallel(model, topo.sp_group)
    net = sharding.wrap(model, topo, device, cfg.sharding, bf16, cfg.reshard_after_forward)  # what the loop calls
    mode = cfg.sharding if world > 1 else "none"
    ema = sharding.EMA(model)      # laid out like the (sharded) parameters
    opt = make_optimizer(cfg, model)
    start, smooth = 0, {}
    if resume:
        pos = ckpt.load_training_state(resume, model, opt, ema)
        start = int(pos["step"])
        smooth = {k: float(v) for k, v in pos.get("smooth", {}).items()}   # the smoothed losses go on as they were
        data = pos["data"]
        if (data["world"], data["streams"], data.get("grad_accum", 1)) != (topo.dp, max(1, cfg.data.num_workers), ga):
            log.warning("resuming with dp=%d, streams=%d, grad_accum=%d (checkpoint: %d, %d, %d): the data order "
                        "differs from an uninterrupted run", topo.dp, max(1, cfg.data.num_workers), ga,
                        data["world"], data["streams"], data.get("grad_accum", 1))
        if rank == 0 and (n := ckpt.truncate_log(out / "log.jsonl", start)):
            say(f"log.jsonl: {n} records after step {start} dropped (this run redoes those steps)")

    # the stream counts micro-batches: optimizer step s takes micro-batches s*ga .. s*ga + ga - 1
    stream = BatchStream(shards, cfg.data, cfg.seed, topo.dp_rank, topo.dp, start_step=start * ga,
                         stop_step=cfg.steps * ga)
    validator = None
    if cfg.val_every > 0:  # every rank: a sharded model needs all of them for each forward
        try:
            validator = Validator(cfg, find_shards(cfg.data, cfg.data.val_split, cfg.data.val_shards))
        except FileNotFoundError as e:
            log.warning("no validation: %s", e)
    live = None
    if cfg.sample_every > 0:   # every rank, as the validator
        from train.livesample import LiveSampler
        live = LiveSampler(cfg, out, rank)
    n_params = sum(p.numel() for p in model.parameters())
    peak = peak_tflops(cfg, device)
    tb = None
    if rank == 0:
        (out / "config.json").write_text(config_json(cfg))
        logf = open(out / "log.jsonl", "a")
        tb = tblog.TBLog(out, purge_step=start + 1 if resume else None) if use_tb else None
        bar = tqdm(total=cfg.steps, initial=start, desc="train", disable=not progress, dynamic_ncols=True)
        print(f"train: {n_params:,} parameters on {device} x{world} (sp {topo.sp}, {mode}"
              + (", bf16" if bf16 else "") + "); buckets "
              + ", ".join(f"{b.name}(bs {b.batch_size}, {len(shards.urls[b.name])} shards)" for b in shards.buckets)
              + (f"; grad_accum {ga}" if ga > 1 else "") + f"; steps {start}->{cfg.steps}", file=sys.stderr)

    def save(step: int) -> None:   # a collective: every rank writes its shards
        meta = {"world": world, "sp": topo.sp, "sharding": mode, "rng": {"seed": cfg.seed}, "smooth": dict(smooth),
                "data": {"step": step, "seed": cfg.seed, "world": topo.dp, "streams": max(1, cfg.data.num_workers),
                         "grad_accum": ga, "buckets": [b.name for b in shards.buckets],
                         "weights": stream.weights.tolist()}}
        ckpt.save_checkpoint(out, step, model, opt, ema, meta, {"train": cfg.to_dict(), "model": model.config.to_dict()},
                             cfg.keep_last, cfg.export, rank)

    # -- the steps
    streams: dict[int, dict] = {}
    last = {"step": start}
    t_prev = time.perf_counter()
    batches = iter(make_loader(stream))
    try:
        for step in range(start, cfg.steps):
            seed_step(cfg.seed, step, topo.dp_rank)
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, step)
            opt.zero_grad(set_to_none=True)
            rng = step_rng(cfg.seed, step, topo.dp_rank)
            micro: list[tuple[str, float]] = []        # (bucket, loss) of each micro-batch
            # batch, tokens, flops, drop counts, summed over the micro-batches
            sums = dict(batch=0, tokens=0, flops=0.0, drop_all=0, drop_frames=0)
            for _ in range(ga):
                batch = next(batches)
                drops: dict = {}
                loss = compute_loss(net, batch, text, cfg, rng, device, bf16, stats=drops)
                if not torch.isfinite(loss):  # before the update: the weights and the last checkpoint stay clean
                    raise FloatingPointError(f"step {step}: loss is {float(loss)} on bucket {batch.bucket}; lower lr "
                                             f"or check the latents of {batch.keys}; resume from {out}/checkpoints/latest")
                (loss / ga).backward()   # the accumulated gradient: the mean of the micro-batches' gradients
                rng = rng.after(drops["batch"])
                micro.append((batch.bucket, float(loss.detach())))
                for k in ("batch", "drop_all", "drop_frames"):
                    sums[k] += drops[k]
                sums["tokens"] += latent_tokens(model.config, batch.latent_shape)
                sums["flops"] += step_flops(model.config, n_params, batch.latent_shape)
                streams[batch.stats.get("stream", 0)] = batch.stats
            gnorm = sharding.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            ema.update(model, cfg.ema_decay)

            # -- the record of the step: sums over data parallel (an SP group counts once)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            dt, t_prev = now - t_prev, now
            lv = float(np.mean([v for _, v in micro]))
            vals = torch.tensor([lv, sums["batch"], sums["tokens"], sums["flops"], sums["drop_all"],
                                 sums["drop_frames"]], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(vals)
                vals[1:] /= topo.sp  # the ranks of an SP group share one batch
            val = None
            if validator is not None and ((step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps):
                val = validator(net, text, device, bf16)
            clip = live(model, ema, text, device, bf16, step + 1) if live is not None and live.due(step + 1) else None
            if rank == 0:
                for bucket, v in micro:
                    smooth[bucket] = v if bucket not in smooth else 0.9 * smooth[bucket] + 0.1 * v
                rec = {"step": step + 1, "bucket": micro[0][0], "loss": lv, "loss_mean_ranks": float(vals[0]) / world,
                       "loss_by_bucket": dict(smooth), "lr": lr_at(cfg, step), "grad_norm": float(gnorm),
                       "batch": int(round(float(vals[1]))), "grad_accum": ga, "drop_all": int(round(float(vals[4]))),
                       "drop_frames": int(round(float(vals[5]))),
                       "step_s": dt, "samples_per_s": float(vals[1]) / dt, "latent_tokens_per_s": float(vals[2]) / dt,
                       "loader": total_stats(streams)}
                if ga > 1:
                    rec["buckets"] = [b for b, _ in micro]
                if peak:
                    rec["mfu"] = float(vals[3]) / dt / (peak * 1e12 * world)
                if device.type == "cuda":
                    rec["max_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
                if val is not None:
                    rec.update(val)
                if clip is not None:
                    rec["sample"] = str(clip["dir"])
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                if tb is not None:
                    tb.record(rec)
                    if clip is not None:
                        tb.clip(clip, step + 1)
                    tb.flush()
                bar.update(1)
                if (step + 1) % max(1, cfg.log_every) == 0 or step + 1 == cfg.steps:
                    bar.set_postfix(loss=f"{lv:.4f}", bucket=micro[0][0], lr=f"{rec['lr']:.2e}")
            last = {"step": step + 1, "loss": lv}
            stopping = stop is not None and stop.agreed(device, world)  # SIGTERM/SIGINT: every rank stops here
            if stopping or (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps:
                save(step + 1)
            if stopping and step + 1 < cfg.steps:
                last["stopped"] = stop.name
                break
    finally:
        batches.close()   # the loader's workers and shared memory go now, also after an error
        if tb is not None:
            tb.close()

    # -- the summary
    held = sharding.gather_ints(list(sharding.state_bytes(model, opt, ema).values()), world)   # per rank: params, optimizer, ema
    if rank == 0:
        bar.close()
        logf.close()
    if world > 1:
        dist.barrier()
    return {"step": last["step"], "loader": total_stats(streams), "out": str(out), "sharding": mode,
            "state_bytes_per_rank": {k: [r[i] for r in held] for i, k in enumerate(("params", "optimizer", "ema"))},
            **({"stopped": last["stopped"]} if "stopped" in last else {})}


@cli.entry
def main(argv: list[str] | None = None) -> int:
    ap = cli.ArgumentParser(prog="mdv2-train", formatter_class=argparse.RawDescriptionHelpFormatter,
                            description=__doc__)
    ap.add_argument("--config", help="train config: a name (demo, stage1, stage2, stage3, ...: train/configs/NAME.yaml, "
                                     "shipped with the package) or a YAML path; default: built-in defaults "
                                     "or, with --resume, the checkpoint's own config")
    ap.add_argument("--out", help="run folder: log.jsonl, config.json, checkpoints/ (overrides config 'out')")
    ap.add_argument("--data-root", help="the pipeline's output folder or bucket (data.root)")
    ap.add_argument("--stage", help="stage config name or path for per-bucket batch sizes (data.stage)")
    ap.add_argument("--text-encoder", help="local T5 folder (data.text_encoder)")
    ap.add_argument("--text-cache", help="caption embedding cache folder (data.text_cache)")
    ap.add_argument("--steps", type=int, help="total optimizer steps")
    ap.add_argument("--model", help="model preset: tiny | small | paper")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--sp", type=int, help="sequence parallel size: tokens of a sample split over this many ranks "
                                           "(must divide the world size and the head count)")
    ap.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                    help="continue from a checkpoint folder, or (no value) from the latest checkpoint of --out")
    ap.add_argument("--overwrite", action="store_true",
                    help="start a new run in an --out that holds another run: its checkpoints and log.jsonl are "
                         "deleted first (without it such an --out is refused; --resume continues it instead)")
    ap.add_argument("--init-from", metavar="CKPT",
                    help="start a new stage from the weights of a checkpoint (or run) folder: optimizer, step, "
                         "warm-up and EMA start fresh; new modules start as identities (init_from)")
    ap.add_argument("--init-allow-drop", action="store_true",
                    help="with --init-from: allow the new config to drop trained modules (init_allow_drop)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override any config field, e.g. --set flow.cfg_scale=2.5 --set data.num_workers=2")
    ap.add_argument("--vae", help="CogVAE folder to decode the clips sampled during training (vae; sample_every)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (the JSONL log is still written)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    resume = None
    if a.init_from is not None and a.resume is not None:
        ap.error("--init-from starts a new stage from a checkpoint's weights and --resume continues a run: use one")
    if a.overwrite and a.resume is not None:
        ap.error("--overwrite starts a new run over an old one and --resume continues it: use one")
    if a.init_from is not None:
        try:
            a.init_from = str(ckpt.resolve(a.init_from))
        except FileNotFoundError as e:
            ap.error(f"--init-from: {e}")
    if a.resume is not None:
        if not a.resume and not a.out and not a.config:
            ap.error("--resume without a path needs --out (the run folder) or --config")
        if a.resume:
            resume = str(ckpt.resolve(a.resume))
        else:
            run_dir = a.out or load_config(a.config, a.set).out
            resume = str(ckpt.resolve(run_dir))
    if resume and not a.config:  # the checkpoint's own config, so the run continues as it was
        cfg = load_config(None, a.set, base=ckpt.load_config(resume)["train"])
    else:
        cfg = load_config(a.config, a.set)
    if a.init_from is not None:
        cfg.init_from = a.init_from
    if a.init_allow_drop:
        cfg.init_allow_drop = True
    for flag, key in (("out", "out"), ("steps", "steps"), ("model", "model"), ("seed", "seed"), ("sp", "sp"),
                      ("vae", "vae")):
        if getattr(a, flag) is not None:
            setattr(cfg, key, getattr(a, flag))
    for flag, key in (("data_root", "root"), ("stage", "stage"), ("text_encoder", "text_encoder"),
                      ("text_cache", "text_cache")):
        if getattr(a, flag) is not None:
            setattr(cfg.data, key, getattr(a, flag))
    try:
        check_sp(cfg.sp, int(os.environ.get("WORLD_SIZE", 1)))
    except ValueError as e:
        ap.error(str(e))
    from model.stages import StageInitError
    stop = signals.GracefulStop().install()  # SIGTERM/SIGINT: finish the step, checkpoint, exit 4
    try:
        summary = train(cfg, resume, progress=not a.no_progress, overwrite=a.overwrite, stop=stop)
    except StageInitError as e:
        ap.error(str(e))
    except RuntimeError as e:  # a stalled or dead DataLoader worker: one line, exit 5 (train/watchdog.py)
        failure = watchdog.explain(e)
        if failure is None:
            raise
        print(f"error: {failure}", file=sys.stderr)
        return watchdog.EXIT_WORKER
    finally:
        stop.release(int(os.environ.get("WORLD_SIZE", 1)))
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(summary))
    if "stopped" in summary:
        print(f"train: stopped by {summary['stopped']} after step {summary['step']}, checkpoint written; "
              f"continue with --resume", file=sys.stderr)
    if dist.is_initialized():
        dist.destroy_process_group()
    return signals.EXIT_STOPPED if "stopped" in summary else 0


if __name__ == "__main__":
    sys.exit(main())
