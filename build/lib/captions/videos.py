"""Caption a new dataset: a folder of clips, each a video per view or an image sequence per view.

Accepted layouts under ROOT (one clip per entry, the clip key is the entry's name):
- ``ROOT/<clip>/<VIEW>.mp4`` (any of .mp4 .mov .mkv .avi .webm): multi-view videos;
- ``ROOT/<clip>/<VIEW>/*.jpg`` (or .jpeg .png), sorted by file name: image sequences;
- ``ROOT/<clip>.mp4`` or ``ROOT/<clip>/*.jpg``: single-view clips (view label "video" / "images").
Views named like nuScenes cameras are ordered as pipeline.contract.schema.VIEWS (front row, then
back row of the mosaic); others alphabetically. The middle frame is index (N-1)//2 of
the N decoded frames (PyAV for videos), re-encoded as JPEG quality 95 so the hash and
the request are deterministic.
"""
from __future__ import annotations

import io
from pathlib import Path

from captions.engine import CaptionItem
from captions.images import View
from pipeline.contract import schema
from pipeline.contract.cli import InputNotFound

VIDEO_EXT = (".mp4", ".mov", ".mkv", ".avi", ".webm")
IMAGE_EXT = (".jpg", ".jpeg", ".png")


def middle_frame_video(path: str | Path) -> bytes:
    """JPEG bytes of frame (N-1)//2 of a video, decoding sequentially (exact, no keyframe seek)."""
    import av
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        n = stream.frames
        if not n:  # container does not record a frame count: count by decoding
            n = sum(1 for _ in container.decode(stream))
            container.seek(0)
        if n == 0:
            raise ValueError(f"{path}: no video frames")
        target = (n - 1) // 2
        for i, frame in enumerate(container.decode(stream)):
            if i == target:
                buf = io.BytesIO()
                frame.to_image().convert("RGB").save(buf, format="JPEG", quality=95)
                return buf.getvalue()
    raise ValueError(f"{path}: decoded fewer than {target + 1} frames (file says {n})")


def middle_frame_sequence(folder: Path) -> bytes:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXT)
    if not files:
        raise ValueError(f"{folder}: no {IMAGE_EXT} images")
    return files[(len(files) - 1) // 2].read_bytes()


def _order(names: list[str]) -> list[str]:
    rank = {v: i for i, v in enumerate(schema.VIEWS)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def _clip_sources(entry: Path) -> dict[str, Path]:
    """view label -> video file or image folder."""
    if entry.is_file():
        return {"video": entry} if entry.suffix.lower() in VIDEO_EXT else {}
    views: dict[str, Path] = {}
    for p in entry.iterdir():
        if p.is_file() and p.suffix.lower() in VIDEO_EXT:
            views[p.stem] = p
        elif p.is_dir() and any(q.suffix.lower() in IMAGE_EXT for q in p.iterdir()):
            views[p.name] = p
    if not views and any(q.suffix.lower() in IMAGE_EXT for q in entry.iterdir()):
        views["images"] = entry
    return views


def load_views(sources: dict[str, Path]) -> list[View]:
    out = []
    for label in _order(list(sources)):
        p = sources[label]
        out.append(View(label, middle_frame_video(p) if p.is_file() else middle_frame_sequence(p)))
    return out


def folder_items(root: str | Path) -> list[CaptionItem]:
    root = Path(root)
    if not root.is_dir():
        raise InputNotFound(f"{root} is not a folder of clips (expected ROOT/<clip>/<VIEW>.mp4 or "
                            f"ROOT/<clip>/<VIEW>/*.jpg)")
    items = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        sources = _clip_sources(entry)
        if not sources:
            continue
        key = entry.stem if entry.is_file() else entry.name
        items.append(CaptionItem(key=key, load_views=lambda s=sources: load_views(s), scene_name=key))
    if not items:
        raise InputNotFound(f"no clips under {root}: expected <clip>/<VIEW>.mp4, <clip>/<VIEW>/*.jpg, "
                            f"<clip>.mp4 or <clip>/*.jpg")
    return items


def quarantine_uri_for(table_uri: str) -> str:
    base = str(table_uri)
    return (base[:-len(".parquet")] if base.endswith(".parquet") else base) + ".quarantine.parquet"


def caption_folder(root: str | Path, table_uri: str, cfg, progress: bool = True):
    """Caption every clip under root into the caption table at table_uri (the cache);
    failures go to <table>.quarantine.parquet. Returns the CaptionResult."""
    from captions.config import CaptionConfigError
    from captions.engine import run_captions
    from captions.table import write_quarantine_file
    if cfg.mode == "dataset":
        raise CaptionConfigError("a folder of videos has no dataset descriptions: use --mode mllm (with "
                                 "OPENAI_BASE_URL) or --mode none")
    if cfg.mode == "mllm":
        cfg.require_endpoint()
    items = folder_items(root)
    res = run_captions(items, cfg, str(table_uri), None, progress)
    write_quarantine_file(quarantine_uri_for(str(table_uri)), res.quarantine, {it.key for it in items})
    return res
