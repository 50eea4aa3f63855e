"""What a build is made of, before any work: its scenes, its VAE and captions, and the content hash those
decide (the manifests' config hash: a resume or a no-op rebuild trusts only shards made of the same)."""
from __future__ import annotations

import json
import os
import time

from pipeline.contract import cli
from pipeline.shards.build_config import BuildConfig, BuildSummary
from pipeline.shards.encode import EncodeConfig, vae_meta
from pipeline.shards.write import config_hash
from pipeline.shards.rebuild import input_fingerprint, noop_summary


def scene_names(cfg: BuildConfig) -> list[str]:
    from pipeline.scenes.nuscenes import check_tables
    from pipeline.scenes.tableindex import read_scenes
    tables = check_tables(cfg.dataroot, cfg.version)
    path = os.path.join(tables, "scene.json")
    names = sorted(s["name"] for s in read_scenes(tables))  # checked: a bad scene.json is one line naming it
    if cfg.scenes:
        unknown = sorted(set(cfg.scenes) - set(names))
        if unknown:
            raise cli.BadInput(f"--scenes {unknown} not in {path}")
        names = [n for n in names if n in set(cfg.scenes)]
    return names[:cfg.limit_scenes] if cfg.limit_scenes else names


def vae_digest(vae_dir: str) -> str:
    """Content hash of the VAE folder (config + weights): other weights must never pass for a resume."""
    import hashlib
    h = hashlib.sha256()
    for name in sorted(os.listdir(vae_dir)):
        if name.endswith((".json", ".safetensors")):
            h.update(name.encode())
            with open(os.path.join(vae_dir, name), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def content(cfg: BuildConfig):
    """(vae meta, caption config, caption source, content hash): what decides the shards' bytes."""
    from captions.stage import stage_caption_config
    from pipeline.scenes.buckets import load_stage
    load_stage(cfg.stage)   # a wrong --config is its one error line before anything reads the stage file
    cfg.encode = cfg.encode or EncodeConfig(vae=cfg.vae)
    cfg.encode.vae = cfg.vae
    vae = vae_meta(cfg.vae)
    ccfg = stage_caption_config(cfg.stage, cfg.captions, base_url=cfg.caption_base_url, model=cfg.caption_model,
                                timeout_s=cfg.caption_timeout, max_retries=cfg.caption_retries,
                                concurrency=cfg.caption_concurrency)
    captions = ccfg.mode if ccfg.mode != "mllm" else f"mllm:{ccfg.model}:{ccfg.prompt_version}"
    return vae, ccfg, captions, config_hash(cfg.content_config(vae, vae_digest(cfg.vae), captions))


def is_tiny_vae(vae_dir: str) -> bool:
    from pipeline.shards.vae import TINY_VAE_CONFIG
    with open(os.path.join(vae_dir, "config.json")) as f:
        c = json.load(f)
    return list(c.get("block_out_channels", [])) == list(TINY_VAE_CONFIG["block_out_channels"])


def nothing_to_do(cfg: BuildConfig) -> BuildSummary | None:
    """The early exit of a rebuild that would only skip shards (pipeline/shards/rebuild.py): the last complete
    build's summary, without starting Ray; None = run the build. --timeline and --verify-resume always run it."""
    if cfg.timeline or cfg.verify_resume:
        return None
    t0 = time.perf_counter()
    *_, cfg_hash = content(cfg)
    summary = noop_summary(cfg.out, cfg_hash, input_fingerprint(cfg.dataroot, cfg.version, scene_names(cfg)))
    if summary is not None:
        summary.seconds = {"noop_check": time.perf_counter() - t0}
    return summary
