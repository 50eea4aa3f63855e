"""Sample a multi-view clip with a trained checkpoint and write it as video.

    python -m train.sample --ckpt runs/demo --vae demo_out/vae --data-root demo_out/shards --out runs/demo/samples

Conditions (each view's boxes, per-frame cameras, trajectory, BEV map, caption) come from a
val sample of the shards. ``--frames T`` generates any 4k+1 length, also one no bucket had
(e.g. 13 from a 9-frame sample): longer clips extend the conditions by holding the last frame
(the ego stops, every object keeps its last box), shorter ones take the first T frames
(train/clip_length.py). Latents are integrated with the Euler sampler (30 steps, CFG: the unconditional
branch drops text, camera, boxes and trajectory and uses the null map), decoded view by
view with the CogVAE folder, and written as one mp4 per view, a 2x3 grid mp4 and a PNG
contact sheet of the middle frame with the conditioning boxes projected into each view.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model.conditions import CONDITION_NAMES, Conditions
from pipeline.contract import cli, schema
from pipeline.contract.shardio import iter_shard
from train import checkpoint as ckpt
from train import clip_length, flow
from train.config import TrainConfig
from train.data import collate, decode, find_shards, open_url
from train.train import TextSource
from train.video import contact_sheet, grid, to_uint8, write_mp4


def cat_conditions(a: Conditions, b: Conditions) -> Conditions:
    return Conditions(**{f.name: torch.cat([getattr(a, f.name), getattr(b, f.name)]) for f in fields(Conditions)})


def load_model(path: str, weights: str = "ema"):
    from model.registry import build_from_config
    conf = ckpt.load_config(path)
    model = build_from_config(conf["model"])
    model.load_state_dict(ckpt.load_weights(path, weights))
    return model.eval(), TrainConfig.from_dict(conf["train"])


def first_sample(cfg: TrainConfig, split: str, bucket: str | None, index: int) -> tuple[dict, dict]:
    """The index-th sample (tar order) of a bucket's val shards, decoded, and its meta."""
    shards = find_shards(cfg.data, split, cfg.data.val_shards if split == cfg.data.val_split else [])
    names = [b.name for b in shards.buckets]
    name = bucket or names[0]
    if name not in names:
        raise cli.BadInput(f"bucket {name!r} not among the {split} buckets {names}")
    n = 0
    for url in shards.urls[name]:
        with open_url(url) as f:  # local, s3://, gs:// or pipe:, like the trainer
            for key, members in iter_shard(f):
                if n == index:
                    return decode(dict(members, __key__=key, __url__=url)), json.loads(members["meta.json"])
                n += 1
    raise cli.OutOfRange(f"{split}/{name} has only {n} samples; --index {index} is out of range")


@torch.no_grad()
def decode_latents(vae_folder: str, latents: torch.Tensor, scaling_factor: float, device) -> np.ndarray:
    """(V, 16, T', h, w) scaled latents -> (V, T, H, W, 3) uint8 with T = 4(T'-1) + 1, one view at a
    time (memory).

    diffusers' CogVAE decoder decodes latents 2 at a time and treats a batch's first latent as
    the clip's single first frame only when the batch is odd, so an even T' (T = 13, 5, ...: the
    4k+1 lengths that are not 8k+1) would come out as 4T' frames with frame 0 stretched. Such
    latents get a copy of their last latent appended (T' odd again, every real latent keeps its
    place) and the decoded clip is cut back to T; the pad only touches the last 4 frames' norms."""
    from diffusers import AutoencoderKLCogVideoX
    vae = AutoencoderKLCogVideoX.from_pretrained(vae_folder, local_files_only=True, low_cpu_mem_usage=False).to(device).eval()
    tl = latents.shape[2]
    t = schema.VAE_TEMPORAL_COMPRESSION * (tl - 1) + 1
    if tl % 2 == 0:
        latents = torch.cat([latents, latents[:, :, -1:]], 2)                           # (V, 16, T'+1, h, w)
    out = []
    for v in tqdm(range(latents.shape[0]), desc="decode views"):
        video = vae.decode(latents[v:v + 1].to(device, torch.float32) / scaling_factor).sample  # (1, 3, T, H, W)
        out.append(to_uint8(video[0, :, :t].permute(1, 0, 2, 3).float().cpu().numpy()))    # (T, H, W, 3)
    return np.stack(out)


def sample(ckpt_path: str, vae: str, out: str, data_root: str | None = None, split: str | None = None,
           bucket: str | None = None, index: int = 0, weights: str = "ema", steps: int | None = None,
           cfg_scale: float | None = None, seed: int = 0, device: str = "cpu", text_encoder: str | None = None,
           text_cache: str | None = None, frames: int | None = None) -> dict:
    model, cfg = load_model(ckpt_path, weights)
    cfg = copy.deepcopy(cfg)
    for key, value in (("root", data_root), ("text_encoder", text_encoder), ("text_cache", text_cache)):
        if value is not None:
            setattr(cfg.data, key, value)
    dev = torch.device(device)
    model.to(dev)
    s, meta = first_sample(cfg, split or cfg.data.val_split, bucket, index)
    source_frames = s["shape"][2]
    s = clip_length.fit_frames(s, frames or source_frames)
    batch = collate([s], 0, schema.bucket_name(*s["shape"]))
    text = TextSource(cfg.data.text_cache, cfg.data.text_encoder, cfg.data.text_max_length)
    cond = batch.conditions(*text.embed(batch.captions), dev)
    _, v, c, tl, h, w = batch.latent_shape
    cond2 = cat_conditions(cond, cond)
    steps = steps or cfg.flow.sample_steps
    scale = cfg.flow.cfg_scale if cfg_scale is None else cfg_scale

    def velocity(x, t, drop):
        return model(x, t, cond2 if x.shape[0] == 2 else cond, drop)

    noise = torch.randn((1, v, c, tl, h, w), generator=torch.Generator().manual_seed(seed)).to(dev)
    latents = flow.euler_sample(velocity, noise, steps=steps, shift=flow.shift_factor(cfg.flow, h * 8, w * 8, tl),
                                cfg_scale=scale, null_drop={n: True for n in CONDITION_NAMES},
                                progress=lambda r: tqdm(r, desc="sample"))
    frames = decode_latents(vae, latents[0], float(meta["vae"]["scaling_factor"]), dev)  # (V, T, H, W, 3)
    out_dir = Path(out)
    names = list(meta["views"])
    files = [write_mp4(out_dir / f"{name}.mp4", frames[i], fps=int(meta["fps"])) for i, name in enumerate(names)]
    files.append(write_mp4(out_dir / "grid.mp4", grid(frames, cols=min(3, len(names))), fps=int(meta["fps"])))
    t_mid = frames.shape[1] // 2
    n_frames = s["view_boxes"].shape[0]
    tb = min(n_frames - 1, t_mid)  # decoded T equals the clip's T for CogVAE (4k+1)
    files.append(contact_sheet(out_dir / "contact_sheet.png", frames[:, t_mid], s["view_boxes"][tb],
                               s["box_mask"][tb], s["box_class"], s["intrinsics"], s["cam2lidar"][tb], names,
                               filled=s["fill_mask"][tb]))
    info = {"key": s["key"], "caption": s["caption"], "steps": steps, "cfg_scale": scale, "weights": weights,
            "seed": seed, "frames": list(frames.shape), "source_frames": source_frames,
            "length_rule": "crop" if n_frames < source_frames else "hold" if n_frames > source_frames else "as is",
            "filled": np.argwhere(s["fill_mask"]).tolist(),   # [t, v] whose source frame was a repaired drop
            "files": [str(f) for f in files]}
    (out_dir / "sample.json").write_text(json.dumps(info, indent=2))
    return info


@cli.entry(user_errors=(schema.SchemaError,))  # shards that break the contract are bad input here
def main(argv: list[str] | None = None) -> int:
    ap = cli.ArgumentParser(prog="mdv2-sample", formatter_class=argparse.RawDescriptionHelpFormatter,
                            description=__doc__)
    ap.add_argument("--ckpt", required=True, help="checkpoint folder, or a run folder (its latest checkpoint)")
    ap.add_argument("--vae", required=True, help="CogVAE folder (diffusers AutoencoderKLCogVideoX, local)")
    ap.add_argument("--out", required=True, help="folder for <VIEW>.mp4, grid.mp4, contact_sheet.png, sample.json")
    ap.add_argument("--data-root", help="shards root (default: the one in the checkpoint's config)")
    ap.add_argument("--split", help="split to take conditions from (default: the run's val split)")
    ap.add_argument("--bucket", help="bucket name, e.g. 64x128_t9 (default: the first one)")
    ap.add_argument("--index", type=int, default=0, help="which sample of that bucket (tar order)")
    ap.add_argument("--weights", choices=["ema", "model"], default="ema")
    ap.add_argument("--steps", type=int, help="Euler steps (default: config flow.sample_steps = 30)")
    ap.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (default: config)")
    ap.add_argument("--seed", type=int, default=0, help="noise seed")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--text-encoder", help="T5 folder (default: the run's)")
    ap.add_argument("--text-cache", help="text embedding cache (default: the run's)")
    ap.add_argument("--frames", type=int, help="frames to generate, any 4k+1 (default: the sample's own); longer "
                    "than the sample holds its last frame, shorter takes its first frames")
    a = ap.parse_args(argv)
    if a.frames is not None and not schema.valid_num_frames(a.frames):
        lo = 4 * ((a.frames - 1) // 4) + 1
        near = f"use {lo} or {lo + 4}" if a.frames > 1 else "use 1 or more"
        raise cli.BadInput(f"--frames {a.frames}: the model generates 4k+1 frames (1, 5, 9, 13, 17, ...); {near}")
    from pipeline.shards.encode import vae_meta
    vae_meta(a.vae)  # a --vae folder without config.json fails now, not after sampling
    info = sample(a.ckpt, a.vae, a.out, a.data_root, a.split, a.bucket, a.index, a.weights, a.steps, a.cfg_scale,
                  a.seed, a.device, a.text_encoder, a.text_cache, a.frames)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
