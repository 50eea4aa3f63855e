"""The lean trainer: MVDiT + rectified flow on bucketed webdataset shards.

    python -m train.train --config configs/train/demo.yaml --set data.root=demo_out/shards --out runs/demo
    torchrun --nproc_per_node 8 -m train.train --config ... --out runs/stage2     # FSDP2 (NCCL on GPUs)
    python -m train.train --out runs/demo --resume                                # continue exactly

One step: the schedule picks this step's bucket (train/buckets.py), the stream gives a
batch of it (train/data.py), the classifier-free-guidance drops are drawn (all conditions
of a sample together, or boxes and trajectory of some frames: `condition_drops`), t is drawn
logit-normal + shifted, the model predicts the velocity of x_t and the MSE is minimised
(train/flow.py). AdamW at a constant LR after a linear warm-up, gradient clipping, an fp32
EMA of the weights. On several processes the training state is sharded (FSDP2) or
replicated (DDP): train/sharding.py. Every random draw of step s on data-parallel rank r
comes from a generator seeded with (seed, s, r), and the data order is a function of
(seed, step), so training N steps and resuming N more gives the same weights as training 2N.

The shape of `train()`: setup (process groups, run folder, shards, model, sharding, EMA,
optimizer, resume) -> `for batch in loader: one_step(...); log; maybe save` -> summary.
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
from train import flow, sharding, signals, watchdog
from train.config import FlowConfig, TrainConfig, config_json, load_config
from train.data import Batch, BatchStream, ShardSet, find_shards, make_loader, total_stats
from train.distributed import check_sp, make_topology, setup_distributed
from train.textsource import TextSource  # noqa: F401  (train.train.TextSource: the sampler's import)

log = logging.getLogger("train")

# bf16 dense peak TFLOP/s by GPU name, for the MFU estimate (override with peak_tflops)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
               "4090": 165.0, "A10": 125.0}


# ---- small pure pieces (the tests call these) -----------------------------------------

def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The one RNG of a (step, rank): timesteps, noise and condition drops all come from it."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 1_009 + rank * 7_919) % (2 ** 63))


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed torch's global RNG per (step, rank), for any randomness inside the model (dropout)."""
    torch.manual_seed((seed * 1_000_003 + step * 1_009 + rank) % (2 ** 63))


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over cfg.warmup steps, then constant (paper Appendix E). `step` counts from
    the start of the stage: an --init-from run starts at step 0, so every stage gets the warm-up
    of its own config (and --resume continues the stage's count)."""
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))


def condition_drops(batch: int, frames: int, cfg: FlowConfig, gen: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The CFG drops of one batch, as the authors train (scripts/train_magicdrive.py):
    -> drop_cond (B,) bool: text, camera, boxes and trajectory all replaced by their nulls,
       for a `cfg.drop_all` share of the samples (the map is never dropped);
       drop_frames (B, T) bool over pixel frames: boxes and trajectory of that frame masked.
    A sample with everything dropped has every frame masked too; each other sample masks
    int(drop_frames_ratio * (T - 2)) interior frames drawn without replacement (never the first
    or the last frame: the authors' `random.sample(range(1, T - 1), int(0.4 * (T - 2)))`)."""
    drop_cond = torch.rand(batch, generator=gen) < cfg.drop_all
    drop_frames = drop_cond[:, None].repeat(1, frames)
    k = int(cfg.drop_frames_ratio * (frames - 2)) if frames > 2 else 0
    for i in range(batch):
        if k and not drop_cond[i]:
            drop_frames[i, 1 + torch.randperm(frames - 2, generator=gen)[:k]] = True
    return drop_cond, drop_frames


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


def compute_loss(model, batch: Batch, text: TextSource, cfg: TrainConfig, gen: torch.Generator,
                 device: torch.device, autocast: bool, drops: bool = True, stats: dict | None = None) -> torch.Tensor:
    """The rectified-flow v-prediction loss of one batch; every random draw comes from ``gen``.
    ``drops`` False: no condition dropped (validation). ``stats`` gets the drop counts."""
    x0 = batch.sample_latents(gen)                                        # (B, V, 16, T', H', W')
    b, _, _, tl, h, w = x0.shape
    emb, mask = text.embed(batch.captions)
    cond = batch.conditions(emb, mask, device)
    shift = flow.shift_factor(cfg.flow, h * 8, w * 8, tl)
    t = flow.sample_timesteps(b, cfg.flow, shift, gen)                    # (B,)
    noise = torch.randn(x0.shape, generator=gen)
    drop_cond, drop_frames = condition_drops(b, cond.num_frames, cfg.flow if drops else
                                             FlowConfig(drop_all=0.0, drop_frames_ratio=0.0), gen)  # (B,), (B, T)
    if stats is not None:
        stats.update(drop_all=int(drop_cond.sum()), drop_frames=int(drop_frames[~drop_cond].sum()), batch=b)
    x0, noise, t = x0.to(device), noise.to(device), t.to(device)
    xt = flow.interpolate(x0, noise, t)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        pred = model(xt, t, cond, drop_cond=drop_cond.to(device), drop_frames=drop_frames.to(device))
    weight = flow.fill_weights(batch.fill_mask, tl, cfg.flow.fill_weight)   # (B, V, T') or None: repaired drops
    return flow.flow_loss(pred, x0, noise, weight)


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
            gen = step_generator(self.cfg.seed, 10**9 + i, 0)
            loss = compute_loss(model, batch, text, self.cfg, gen, device, autocast, drops=False)
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
    start = 0
    if resume:
        pos = ckpt.load_training_state(resume, model, opt, ema)
        start = int(pos["step"])
        data = pos["data"]
        if (data["world"], data["streams"]) != (topo.dp, max(1, cfg.data.num_workers)):
            log.warning("resuming with dp=%d, streams=%d (checkpoint: %d, %d): the data order differs from an "
                        "uninterrupted run", topo.dp, max(1, cfg.data.num_workers), data["world"], data["streams"])
        if rank == 0 and (n := ckpt.truncate_log(out / "log.jsonl", start)):
            say(f"log.jsonl: {n} records after step {start} dropped (this run redoes those steps)")

    stream = BatchStream(shards, cfg.data, cfg.seed, topo.dp_rank, topo.dp, start_step=start, stop_step=cfg.steps)
    validator = None
    if cfg.val_every > 0:  # every rank: a sharded model needs all of them for each forward
        try:
            validator = Validator(cfg, find_shards(cfg.data, cfg.data.val_split, cfg.data.val_shards))
        except FileNotFoundError as e:
            log.warning("no validation: %s", e)
    n_params = sum(p.numel() for p in model.parameters())
    peak = peak_tflops(cfg, device)
    if rank == 0:
        (out / "config.json").write_text(config_json(cfg))
        logf = open(out / "log.jsonl", "a")
        bar = tqdm(total=cfg.steps, initial=start, desc="train", disable=not progress, dynamic_ncols=True)
        print(f"train: {n_params:,} parameters on {device} x{world} (sp {topo.sp}, {mode}"
              + (", bf16" if bf16 else "") + "); buckets "
              + ", ".join(f"{b.name}(bs {b.batch_size}, {len(shards.urls[b.name])} shards)" for b in shards.buckets)
              + f"; steps {start}->{cfg.steps}", file=sys.stderr)

    def save(step: int) -> None:   # a collective: every rank writes its shards
        meta = {"world": world, "sp": topo.sp, "sharding": mode, "rng": {"seed": cfg.seed},
                "data": {"step": step, "seed": cfg.seed, "world": topo.dp, "streams": max(1, cfg.data.num_workers),
                         "buckets": [b.name for b in shards.buckets], "weights": stream.weights.tolist()}}
        ckpt.save_checkpoint(out, step, model, opt, ema, meta, {"train": cfg.to_dict(), "model": model.config.to_dict()},
                             cfg.keep_last, cfg.export, rank)

    # -- the steps
    smooth: dict[str, float] = {}
    streams: dict[int, dict] = {}
    last = {"step": start}
    t_prev = time.perf_counter()
    for batch in make_loader(stream):
        step = batch.step
        seed_step(cfg.seed, step, topo.dp_rank)
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        drops: dict = {}
        loss = compute_loss(net, batch, text, cfg, step_generator(cfg.seed, step, topo.dp_rank), device, bf16,
                            stats=drops)
        if not torch.isfinite(loss):  # before the update: the weights and the last checkpoint stay clean
            raise FloatingPointError(f"step {step}: loss is {float(loss)} on bucket {batch.bucket}; lower lr or "
                                     f"check the latents of {batch.keys}; resume from {out}/checkpoints/latest")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = sharding.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(model, cfg.ema_decay)

        # -- the record of the step: sums over data parallel (an SP group counts once)
        tokens = latent_tokens(model.config, batch.latent_shape)
        flops = step_flops(model.config, n_params, batch.latent_shape)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        dt, t_prev = now - t_prev, now
        vals = torch.tensor([float(loss.detach()), drops["batch"], tokens, flops, drops["drop_all"],
                             drops["drop_frames"]], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(vals)
            vals[1:] /= topo.sp  # the ranks of an SP group share one batch
        val = None
        if validator is not None and ((step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps):
            val = validator(net, text, device, bf16)
        streams[batch.stats.get("stream", 0)] = batch.stats
        if rank == 0:
            lv = float(loss.detach())
            smooth[batch.bucket] = lv if batch.bucket not in smooth else 0.9 * smooth[batch.bucket] + 0.1 * lv
            rec = {"step": step + 1, "bucket": batch.bucket, "loss": lv, "loss_mean_ranks": float(vals[0]) / world,
                   "loss_by_bucket": dict(smooth), "lr": lr_at(cfg, step), "grad_norm": float(gnorm),
                   "batch": int(round(float(vals[1]))), "drop_all": int(round(float(vals[4]))),
                   "drop_frames": int(round(float(vals[5]))),
                   "step_s": dt, "samples_per_s": float(vals[1]) / dt, "latent_tokens_per_s": float(vals[2]) / dt,
                   "loader": total_stats(streams)}
            if peak:
                rec["mfu"] = float(vals[3]) / dt / (peak * 1e12 * world)
            if device.type == "cuda":
                rec["max_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
            if val is not None:
                rec.update(val)
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            bar.update(1)
            if (step + 1) % max(1, cfg.log_every) == 0 or step + 1 == cfg.steps:
                bar.set_postfix(loss=f"{lv:.4f}", bucket=batch.bucket, lr=f"{rec['lr']:.2e}")
        last = {"step": step + 1, "loss": float(loss.detach())}
        stopping = stop is not None and stop.agreed(device, world)  # SIGTERM/SIGINT: every rank stops here
        if stopping or (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps:
            save(step + 1)
        if stopping and step + 1 < cfg.steps:
            last["stopped"] = stop.name
            break

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
    ap.add_argument("--config", help="train config YAML (e.g. configs/train/demo.yaml); default: built-in defaults "
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
    for flag, key in (("out", "out"), ("steps", "steps"), ("model", "model"), ("seed", "seed"), ("sp", "sp")):
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
