"""Sample multi-view clips with a trained checkpoint and write them as video.

    mdv2-sample --ckpt demo_out/run --vae demo_out/tiny-cogvae --data-root demo_out/shards --out demo_out/sample
    mdv2-sample ... --split val --bucket 848x1600_t17 --limit 8 --out samples/      # 8 clips, one folder each
    torchrun --nproc_per_node 8 -m train.sample ... --sp 4 --limit 8              # 2 clips at a time, SP 4

Conditions (each view's boxes, per-frame cameras, trajectory, BEV map, caption) come from a
sample of the shards (default: the run's val split, first bucket, tar order from --index).
``--frames T`` generates any 4k+1 length, also one no bucket had (e.g. 13 from a 9-frame sample):
longer clips extend the conditions by holding the last frame (the ego stops, every object keeps
its last box), shorter ones take the first T frames (train/clip_length.py). Latents are
integrated with the Euler sampler (30 steps, classifier-free guidance: `velocity_fn`, the one
place that calls the model), decoded view by view with the CogVAE folder (tiled: a 848x1600
clip decodes in a few GB, train/vaedecode.py), and written as one mp4 per view, a 2x3 grid mp4,
a PNG contact sheet of the middle frame with the conditioning boxes projected into each view,
latents.safetensors and sample.json. With --limit K, K samples are written to OUT/<key>/.

Under torchrun the world is dp x sp (train/distributed.py): the ranks of an SP group split the
spatial tokens of one clip (model/parallel.py) and then decode its views between them; the dp
groups take the clips in turn (clip i -> group i mod dp). bf16 autocast on a GPU (--precision).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import dataclass, fields
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tqdm import tqdm

from model.conditions import Conditions
from pipeline.contract import cli, schema
from pipeline.contract.shardio import iter_shard
from train import checkpoint as ckpt
from train import clip_length, flow
from train.config import TrainConfig
from train.data import collate, decode, find_shards, open_url
from train.distributed import Topology, make_topology
from train.vaedecode import DecodeConfig, decode_latents, load_decoder  # noqa: F401  (decode_latents: re-exported)
from train.video import contact_sheet, grid, write_mp4, write_pngs


# ---- the model call (INTERFACES.md B: the `model` branch owns what is inside) -----------------

def velocity_fn(model, cond: Conditions, cfg_scale: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """v(x, t) for the Euler sampler: THE call of the model in sampling, guidance included.

    x (B, V, 16, T', H', W'), t (B,) -> v = eps - x0, same shape as x. With guidance the model runs its
    conditional and its null branch in one batch (the authors' null branch: null caption, null boxes,
    learned null camera and ego poses, the map kept: MVDiT.guided_velocity) and combines them as
    v = v_null + s (v_cond - v_null); s = 1 is the conditional alone (one forward)."""
    if cfg_scale == 1.0:
        return lambda x, t: model(x, t, cond)
    return lambda x, t: model.guided_velocity(x, t, cond, cfg_scale)


# ---- processes ----------------------------------------------------------------------------

@dataclass
class Runtime:
    """This process's place in the run (torchrun or one process) and how it computes."""
    topo: Topology
    device: torch.device
    autocast: bool       # bf16
    wait: object = None  # a gloo group over the world that waits a day: groups finish at different times

    @property
    def main(self) -> bool:
        return self.topo.rank == 0

    def wait_all(self, value: int = 0) -> int:
        """Barrier over the world that returns the sum of `value` over the ranks. A CPU (gloo) group
        with a long timeout: a group with fewer or shorter clips may wait long for the others, past
        NCCL's 10 minutes (a rank that fails ends the run anyway: torchrun stops the others)."""
        if self.wait is None:
            return value
        total = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(total, group=self.wait)
        return int(total)

    def sp_barrier(self) -> None:
        """All ranks of this SP group got here (a 1-element all-reduce: works on NCCL and gloo)."""
        if self.topo.sp > 1:
            dist.all_reduce(torch.zeros(1, device=self.device), group=self.topo.sp_group)

    def my_views(self, num_views: int) -> list[int]:
        """The views this rank decodes: view v belongs to SP rank v mod sp."""
        return list(range(self.topo.sp_rank, num_views, self.topo.sp))


def start(device: str = "auto", sp: int = 1, precision: str = "auto") -> Runtime:
    """Join torchrun's process group (if any) and build the dp x sp layout. `device` auto/cuda = this
    rank's local GPU when there is one."""
    from train.train import setup_distributed
    if device == "cuda" and not torch.cuda.is_available():
        raise cli.BadInput("--device cuda: no CUDA GPU on this machine; use --device cpu")
    try:
        rank, world, dev = setup_distributed("auto" if device in ("auto", "cuda") else device)
        topo = make_topology(rank, world, sp)
    except ValueError as e:
        raise cli.BadInput(str(e)) from None
    if precision == "bf16" and dev.type != "cuda":
        raise cli.BadInput("--precision bf16 is for GPUs (CPU bf16 autocast is slow and not tested); use auto or fp32")
    wait = dist.new_group(backend="gloo", timeout=timedelta(days=1)) if world > 1 else None
    return Runtime(topo, dev, dev.type == "cuda" and precision in ("auto", "bf16"), wait)


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---- conditioning samples ---------------------------------------------------------------------

def run_config(path: str, data_root: str | None = None, text_encoder: str | None = None,
               text_cache: str | None = None) -> TrainConfig:
    """The checkpoint's TrainConfig with the data sources the command line names."""
    cfg = copy.deepcopy(TrainConfig.from_dict(ckpt.load_config(path)["train"]))
    for key, value in (("root", data_root), ("text_encoder", text_encoder), ("text_cache", text_cache)):
        if value is not None:
            setattr(cfg.data, key, value)
    return cfg


def split_urls(cfg: TrainConfig, split: str) -> dict[str, list[str]]:
    """bucket name -> shard URLs of a split, found as the trainer finds them (manifest, globs, URLs)."""
    explicit = cfg.data.val_shards if split == cfg.data.val_split else cfg.data.shards if split == cfg.data.split else []
    shards = find_shards(cfg.data, split, explicit)
    return {b.name: shards.urls[b.name] for b in shards.buckets}


def iter_members(urls: list[str]) -> Iterator[tuple[str, dict, str]]:
    """(key, raw members, url) of every sample of the shards, in order; local, s3://, gs:// or pipe:."""
    for url in urls:
        with open_url(url) as f:
            for key, members in iter_shard(f):
                yield key, members, url


def decode_members(key: str, members: dict, url: str) -> tuple[dict, dict]:
    """Raw members -> (decoded sample as the trainer decodes it, meta.json)."""
    return decode(dict(members, __key__=key, __url__=url)), json.loads(members["meta.json"])


def pick_samples(cfg: TrainConfig, split: str, bucket: str | None, index: int, count: int) -> Iterator[tuple]:
    """Samples index .. index + count - 1 (tar order) of one bucket of a split (default: its first) as
    (position, raw members, url); the caller decodes the ones it keeps."""
    urls = split_urls(cfg, split)
    name = bucket or next(iter(urls))
    if name not in urls:
        raise cli.BadInput(f"bucket {name!r} not among the {split} buckets {list(urls)}")
    n = -1
    for n, (key, members, url) in enumerate(iter_members(urls[name])):
        if n >= index + count:
            return
        if n >= index:
            yield n - index, key, members, url
    if n < index:
        raise cli.OutOfRange(f"{split}/{name} has only {n + 1} samples; --index {index} is out of range")


def first_sample(cfg: TrainConfig, split: str, bucket: str | None, index: int) -> tuple[dict, dict]:
    """The index-th sample (tar order) of a bucket's shards, decoded, and its meta."""
    for _, key, members, url in pick_samples(cfg, split, bucket, index, 1):
        return decode_members(key, members, url)
    raise AssertionError("unreachable")  # pick_samples raised OutOfRange


# ---- the sampler -------------------------------------------------------------------------

def load_model(path: str, weights: str = "ema"):
    from model.registry import build_from_config
    conf = ckpt.load_config(path)
    model = build_from_config(conf["model"])
    model.load_state_dict(ckpt.load_weights(path, weights))
    return model.eval(), TrainConfig.from_dict(conf["train"])


@torch.no_grad()
def generate(model, text, cfg: TrainConfig, s: dict, seed: int, steps: int, cfg_scale: float, device: torch.device,
             autocast: bool, progress: bool = False) -> torch.Tensor:
    """Generate the latents of one decoded sample -> (V, 16, T', h, w) float32 on the CPU, in the model's
    (scaled) latent space: decoding divides by the VAE's scaling factor. The noise comes from a CPU generator
    seeded with `seed`: the same on every device, rank and world size (so every rank of a sharded model runs
    the same forwards: the trainer's samples, train/livesample.py, call this on all ranks)."""
    batch = collate([s], 0, schema.bucket_name(*s["shape"]))
    cond = batch.conditions(*text.embed(batch.captions), device)
    # the authors' sampler: each box's latent drawn once per sample (CPU generator: the same on every rank)
    cond = model.draw_box_latent(cond, torch.Generator().manual_seed(seed + 1))
    shape = batch.latent_shape                                                      # (1, V, 16, T', h, w)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    v = velocity_fn(model, cond, cfg_scale)
    shift = flow.shift_factor(cfg.flow, shape[4] * 8, shape[5] * 8, shape[3])
    bar = (lambda r: tqdm(r, desc="sample", leave=False, dynamic_ncols=True)) if progress else None
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        x = flow.euler_sample(lambda x, t, _drop: v(x, t), noise, steps=steps, shift=shift, progress=bar)
    return x[0].float().cpu()


class Sampler:
    """A checkpoint ready to sample on this rank: the model (hooked into the SP group when sp > 1), its
    text source and the CogVAE decoder."""

    def __init__(self, rt: Runtime, ckpt_path: str, vae: str, cfg: TrainConfig, weights: str = "ema",
                 decode_cfg: DecodeConfig | None = None):
        from train.train import TextSource
        self.rt, self.cfg = rt, cfg
        self.model, _ = load_model(ckpt_path, weights)
        self.model.to(rt.device)
        if rt.topo.sp > 1:
            from model.parallel import enable_sequence_parallel
            try:
                enable_sequence_parallel(self.model, rt.topo.sp_group)
            except ValueError as e:  # the SP size does not divide the heads
                raise cli.BadInput(f"--sp {rt.topo.sp}: {e}") from None
        self.text = TextSource(cfg.data.text_cache, cfg.data.text_encoder, cfg.data.text_max_length)
        self.vae = load_decoder(vae, rt.device, decode_cfg)

    def latents(self, s: dict, seed: int, steps: int, cfg_scale: float, progress: bool = False) -> torch.Tensor:
        """Generate the latents of one decoded sample (`generate`) -> (V, 16, T', h, w) float32 on the CPU."""
        return generate(self.model, self.text, self.cfg, s, seed, steps, cfg_scale, self.rt.device, self.rt.autocast,
                        progress and self.rt.main)

    def decode(self, latents: torch.Tensor, views: list[int], scaling_factor: float) -> dict[int, np.ndarray]:
        """{view index: (T, H, W, 3) uint8} for the views listed."""
        return {v: decode_latents(self.vae, latents[v:v + 1], scaling_factor)[0] for v in views}


def gather_views(rt: Runtime, mine: dict[int, np.ndarray], latents: torch.Tensor) -> np.ndarray:
    """Every view's frames (V, T, H, W, 3) uint8 on every rank of the SP group, from each rank's own
    views (Runtime.my_views): one all-gather of a (ceil(V / sp), T, H, W, 3) uint8 tensor per rank.
    The frame shape follows from the latents (V, 16, T', h, w), which every rank of the group holds."""
    sp, num_views = rt.topo.sp, latents.shape[0]
    if sp == 1:
        return np.stack([mine[v] for v in range(num_views)])
    tl, h, w = latents.shape[2:]
    per = -(-num_views // sp)
    local = torch.zeros((per, schema.VAE_TEMPORAL_COMPRESSION * (tl - 1) + 1, h * schema.VAE_SPATIAL_COMPRESSION,
                         w * schema.VAE_SPATIAL_COMPRESSION, 3), dtype=torch.uint8)
    for i, v in enumerate(rt.my_views(num_views)):
        local[i] = torch.from_numpy(mine[v])
    local = local.to(rt.device)
    parts = [torch.empty_like(local) for _ in range(sp)]
    dist.all_gather(parts, local, group=rt.topo.sp_group)
    return np.stack([parts[v % sp][v // sp].cpu().numpy() for v in range(num_views)])


# ---- mdv2-sample ---------------------------------------------------------------------------

def write_sample(out_dir: Path, frames: np.ndarray, latents: torch.Tensor, s: dict, meta: dict, info: dict,
                 pngs: bool = False) -> dict:
    """OUT_DIR/<VIEW>.mp4, grid.mp4, contact_sheet.png, latents.safetensors, sample.json (+ frames/<VIEW>/)."""
    names, fps = list(meta["views"]), int(meta["fps"])
    files = [write_mp4(out_dir / f"{name}.mp4", frames[i], fps=fps) for i, name in enumerate(names)]
    files += [write_pngs(out_dir / "frames" / name, frames[i]) for i, name in enumerate(names) if pngs]
    files.append(write_mp4(out_dir / "grid.mp4", grid(frames, cols=min(3, len(names))), fps=fps))
    t_mid = frames.shape[1] // 2
    tb = min(s["view_boxes"].shape[0] - 1, t_mid)  # decoded T equals the clip's T for CogVAE (4k+1)
    files.append(contact_sheet(out_dir / "contact_sheet.png", frames[:, t_mid], s["view_boxes"][tb],
                               s["box_mask"][tb], s["box_class"], s["intrinsics"], s["cam2lidar"][tb], names,
                               filled=s["fill_mask"][tb]))
    save_file({"latents": latents.contiguous()}, str(out_dir / "latents.safetensors"))   # (V, 16, T', h, w) scaled
    files.append(out_dir / "latents.safetensors")
    info = dict(info, frames=list(frames.shape), files=[str(f) for f in files],
                filled=np.argwhere(s["fill_mask"]).tolist())   # [t, v] whose source frame was a repaired drop
    (out_dir / "sample.json").write_text(json.dumps(info, indent=2))
    return info


def sample(ckpt_path: str, vae: str, out: str, data_root: str | None = None, split: str | None = None,
           bucket: str | None = None, index: int = 0, weights: str = "ema", steps: int | None = None,
           cfg_scale: float | None = None, seed: int = 0, device: str = "auto", text_encoder: str | None = None,
           text_cache: str | None = None, frames: int | None = None, limit: int | None = None, sp: int = 1,
           precision: str = "auto", decode_cfg: DecodeConfig | None = None, progress: bool = True,
           pngs: bool = False, rerun: str | None = None) -> list[dict]:
    """Sample `limit` conditioning samples (None: one, written to `out` itself; K: OUT/<key>/ each) and
    return their sample.json records (those this rank wrote; all of them on one process)."""
    cfg = run_config(ckpt_path, data_root, text_encoder, text_cache)  # a wrong --ckpt fails before any process group
    rt = start(device, sp, precision)
    split = split or cfg.data.val_split
    sampler = Sampler(rt, ckpt_path, vae, cfg, weights, decode_cfg)
    steps = steps or cfg.flow.sample_steps
    scale = cfg.flow.cfg_scale if cfg_scale is None else cfg_scale
    topo, infos = rt.topo, []
    for pos, key, members, url in pick_samples(cfg, split, bucket, index, limit or 1):
        if pos % topo.dp != topo.dp_rank:       # clip i -> data-parallel group i mod dp
            continue
        s, meta = decode_members(key, members, url)
        source_frames = s["shape"][2]
        s = clip_length.fit_frames(s, frames or source_frames)
        lat = sampler.latents(s, seed, steps, scale, progress)
        scaling = float(meta["vae"]["scaling_factor"])
        video = gather_views(rt, sampler.decode(lat, rt.my_views(lat.shape[0]), scaling), lat)
        n = s["view_boxes"].shape[0]
        info = {"key": s["key"], "split": split, "caption": s["caption"], "steps": steps, "cfg_scale": scale,
                "weights": weights, "seed": seed, "source_frames": source_frames,
                "length_rule": "crop" if n < source_frames else "hold" if n > source_frames else "as is",
                "sp": topo.sp, "precision": "bf16" if rt.autocast else "fp32"}
        if topo.sp_rank == 0:
            infos.append(write_sample(Path(out) / (s["key"] if limit else ""), video, lat, s, meta, info, pngs))
            if rerun:  # the generated views in 3-D with what they were conditioned on (pipeline/tools/rerunlog.py)
                from pipeline.tools.rerunlog import write_generated
                rr = Path(rerun) if not limit else Path(rerun).with_name(f"{Path(rerun).stem}-{s['key']}.rrd")
                write_generated(str(rr), s, meta, video)
    rt.wait_all()
    stop()
    return infos


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """The options mdv2-sample and mdv2-generate share."""
    ap.add_argument("--ckpt", required=True, help="checkpoint folder, or a run folder (its latest checkpoint)")
    ap.add_argument("--vae", required=True, help="CogVAE folder (diffusers AutoencoderKLCogVideoX, local)")
    ap.add_argument("--data-root", help="shards root (default: the one in the checkpoint's config)")
    ap.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights (default: %(default)s)")
    ap.add_argument("--steps", type=int, help="Euler steps (default: config flow.sample_steps = 30)")
    ap.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (default: config flow.cfg_scale)")
    ap.add_argument("--device", default="auto", help="auto (this rank's GPU, else cpu), cuda, cpu, cuda:N "
                    "(default: %(default)s)")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="auto: bf16 autocast on a GPU, fp32 on the CPU (default: %(default)s)")
    ap.add_argument("--sp", type=int, default=1, help="sequence parallel size under torchrun: the ranks of a group "
                    "split one clip's tokens; must divide the world and the model's heads (default: %(default)s)")
    ap.add_argument("--text-encoder", help="T5 folder (default: the run's)")
    ap.add_argument("--text-cache", help="text embedding cache (default: the run's)")
    ap.add_argument("--no-tiling", action="store_true", help="decode whole frames (more GPU memory: ~55 GB a "
                    "848x1600 view); default: tiles of --tile px")
    ap.add_argument("--tile", default="240x360", metavar="HxW", help="VAE decode tile in pixels, overlap 1/5 "
                    "(stride a multiple of 8 px) (default: %(default)s)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")


def frames_arg(value: int | None) -> None:
    if value is not None and not schema.valid_num_frames(value):
        lo = 4 * ((value - 1) // 4) + 1
        near = f"use {lo} or {lo + 4}" if value > 1 else "use 1 or more"
        raise cli.BadInput(f"--frames {value}: the model generates 4k+1 frames (1, 5, 9, 13, 17, ...); {near}")


def decode_config(a: argparse.Namespace) -> DecodeConfig:
    try:
        h, w = (int(x) for x in a.tile.lower().split("x"))
    except ValueError:
        raise cli.BadInput(f"--tile {a.tile!r}: expected HxW in pixels, e.g. 240x360") from None
    cfg = DecodeConfig(tiling=not a.no_tiling, tile_height=h, tile_width=w)
    cfg.check()
    from pipeline.shards.encode import vae_meta
    vae_meta(a.vae)  # a --vae folder without config.json fails now, not after sampling
    return cfg


@cli.entry(user_errors=(schema.SchemaError,))  # shards that break the contract are bad input here
def main(argv: list[str] | None = None) -> int:
    ap = cli.ArgumentParser(prog="mdv2-sample", formatter_class=argparse.RawDescriptionHelpFormatter,
                            description=__doc__)
    add_common_args(ap)
    ap.add_argument("--out", required=True, help="folder for <VIEW>.mp4, grid.mp4, contact_sheet.png, "
                    "latents.safetensors, sample.json (with --limit: one subfolder per sample key)")
    ap.add_argument("--split", help="split to take conditions from (default: the run's val split)")
    ap.add_argument("--bucket", help="bucket name, e.g. 64x128_t9 (default: the split's first)")
    ap.add_argument("--index", type=int, default=0, help="first sample of that bucket, tar order (default: 0)")
    ap.add_argument("--limit", type=int, help="sample this many conditioning samples from --index on, each "
                    "into OUT/<key>/ (default: one, into OUT)")
    ap.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    ap.add_argument("--frames", type=int, help="frames to generate, any 4k+1 (default: the sample's own); longer "
                    "than the sample holds its last frame, shorter takes its first frames")
    ap.add_argument("--png", action="store_true", help="also write every frame losslessly: frames/<VIEW>/<ttt>.png")
    ap.add_argument("--rerun", metavar="OUT.rrd", help="also write a Rerun recording of the generated views with "
                    "their conditioning boxes, cameras and map (needs the viewer extra, rerun-sdk; with --limit one "
                    "OUT-<key>.rrd per sample)")
    a = ap.parse_args(argv)
    if a.rerun:
        from pipeline.tools.rerunlog import require_rerun
        require_rerun()  # the viewer extra is missing: say so now, not after sampling
    frames_arg(a.frames)
    if a.limit is not None and a.limit < 1:
        raise cli.BadInput(f"--limit {a.limit}: sample at least 1")
    infos = sample(a.ckpt, a.vae, a.out, a.data_root, a.split, a.bucket, a.index, a.weights, a.steps, a.cfg_scale,
                   a.seed, a.device, a.text_encoder, a.text_cache, a.frames, a.limit, a.sp, a.precision,
                   decode_config(a), progress=not a.no_progress, pngs=a.png, rerun=a.rerun)
    for info in infos:
        print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
