"""The pipeline's caption stage: one caption per clip of the clip index.

``pipeline/build.py`` calls :func:`caption_clips`. Modes (CaptionConfig.mode):
- ``mllm``: the clip's middle frame (its V views, ``middle_frame_paths``) goes to an
  OpenAI-compatible server; needs an endpoint (OPENAI_BASE_URL or cfg.base_url).
- ``dataset``: nuScenes ``scene.description``, source "dataset" (the default when no
  endpoint is configured; the demo uses it).
- ``none``: empty caption, source "none".
The table at ``{out}/captions.parquet`` is the cache; quarantined clips are *absent*
from ``result.captions`` and listed in ``result.quarantine`` (stage "captions"): the
build decides whether to skip them or fall back to ``mode="dataset"`` for them.
"""
from __future__ import annotations

import json
import os

import pyarrow as pa

from captions.config import CaptionConfig
from captions.engine import CaptionItem, CaptionResult, run_captions
from captions.images import View
from pipeline.contract import schema, storage
from pipeline.contract.cli import BadInput


def view_label(path: str, index: int, num_views: int) -> str:
    """nuScenes paths are samples/<CHANNEL>/file.jpg: the folder names the camera."""
    parent = os.path.basename(os.path.dirname(str(path)))
    if parent in schema.VIEWS:
        return parent
    if num_views == len(schema.VIEWS):
        return schema.VIEWS[index]
    return parent or f"view{index}"


def file_views(dataroot: str, paths: list[str]) -> list[View]:
    return [View(view_label(p, i, len(paths)), storage.read_bytes(storage.join(dataroot, p)))
            for i, p in enumerate(paths)]


def read_scene_descriptions(dataroot: str) -> dict[str, str]:
    """scene name -> description (and token -> description) from every <version>/scene.json under dataroot."""
    out: dict[str, str] = {}
    for uri in storage.glob(storage.join(dataroot, "*", "scene.json")):
        try:
            recs = json.loads(storage.read_bytes(uri))
        except ValueError as e:
            raise BadInput(f"{uri}: not valid JSON ({e}); fix or regenerate the table") from None
        if not isinstance(recs, list) or not all(isinstance(r, dict) for r in recs):
            raise BadInput(f"{uri}: expected a JSON array of scene records")
        for rec in recs:
            desc = rec.get("description") or ""
            if "name" in rec:
                out[rec["name"]] = desc
            if "token" in rec:
                out[rec["token"]] = desc
    return out


def clip_items(clips: pa.Table, dataroot: str) -> list[CaptionItem]:
    need = {"key", "middle_frame_paths"}
    missing = need - set(clips.column_names)
    if missing:
        raise BadInput(f"clip index lacks columns {sorted(missing)} (has {clips.column_names}); "
                       f"rebuild it with pipeline/scenes/buckets.py")
    cols = {c: clips.column(c).to_pylist() for c in ("key", "middle_frame_paths", "scene_name", "scene_token")
            if c in clips.column_names}
    items = []
    for i, key in enumerate(cols["key"]):
        paths = list(cols["middle_frame_paths"][i] or [])
        items.append(CaptionItem(key=key, load_views=lambda p=paths: file_views(dataroot, p),
                                 scene_name=(cols.get("scene_name") or [""] * (i + 1))[i] or "",
                                 scene_token=(cols.get("scene_token") or [""] * (i + 1))[i] or ""))
    return items


def stage_caption_config(stage: str, mode: str | None = None, **overrides) -> CaptionConfig:
    """The build's CaptionConfig: defaults + environment, then the stage config's ``captions:`` block (same fields
    as a ``mdv2-caption --config`` file), then the command line (``overrides`` that are not None)."""
    import yaml
    from pipeline.scenes.buckets import stage_path
    path = str(stage_path(stage))
    with open(path) as f:
        block = (yaml.safe_load(f) or {}).get("captions")
    if mode is not None:
        overrides["mode"] = mode
    if block is not None:
        return CaptionConfig.from_file(path, **overrides)
    return CaptionConfig.from_env(**overrides)


def caption_clips(clips: pa.Table, dataroot: str, cfg: CaptionConfig, out: str,
                  scene_descriptions: dict[str, str] | None = None, progress: bool = True) -> CaptionResult:
    """Caption every clip of the clip index; the table ``{out}/captions.parquet`` is updated and is the cache.

    Returns per key (text, meta) where meta is meta.json's ``caption`` field, plus counts,
    tokens, cost and quarantine records (the caller writes them to quarantine.parquet)."""
    if cfg.mode == "mllm":
        cfg.require_endpoint()  # fail before any work, naming OPENAI_BASE_URL
    if cfg.mode == "dataset" and scene_descriptions is None:
        scene_descriptions = read_scene_descriptions(dataroot)
    items = clip_items(clips, dataroot)
    return run_captions(items, cfg, storage.join(out, schema.CAPTIONS_FILE), scene_descriptions, progress)
