"""Test factories: valid samples and shards that obey pipeline/contract/schema.py, without running
the pipeline. Used by the caption, trainer, inspect and stats tests; the pipeline's
own tests use real builds instead."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.contract import schema
from pipeline.contract.shardio import write_shard


def make_sample(scene_name: str = "synth-0001", start: int = 0, num_frames: int = 9, height: int = 64,
                width: int = 128, num_boxes: int = 5, views: tuple[str, ...] = schema.VIEWS, seed: int = 0,
                with_std: bool = True, caption: str = "A sunny day on a city street.", split: str = "train",
                latent_scale: float = 1.0, filled: tuple[tuple[int, int], ...] = ()) -> dict:
    """A random but internally consistent sample dict, ready for schema.encode_sample. ``filled``: (t, v)
    view-frames marked as repaired drops (fill_mask and meta filled)."""
    rng = np.random.default_rng(seed)
    v, t, n = len(views), num_frames, num_boxes
    tl = schema.latent_frames(t)
    shape = (v, schema.LATENT_CHANNELS, tl, height // 8, width // 8)
    boxes = np.zeros((t, n, 7), np.float32)
    boxes[..., 0:2] = rng.uniform(-30, 30, (1, n, 2)) + np.linspace(0, 2, t)[:, None, None]
    boxes[..., 2] = -1.0
    boxes[..., 3:6] = rng.uniform(0.5, 4.0, (1, n, 3))
    boxes[..., 6] = rng.uniform(-np.pi, np.pi, (1, n))
    box_mask = np.ones((t, n), bool)
    if n:
        box_mask[t // 2:, -1] = False  # one object leaves mid-clip
        boxes[~box_mask] = 0.0
    # each view sees the objects a few ms later than CAM_FRONT: a small per-view shift along x
    view_boxes = np.repeat(boxes[:, None], v, axis=1)                     # (T, V, N, 7)
    view_boxes[..., 0] += (np.arange(v, dtype=np.float32) * 0.01)[None, :, None]
    view_boxes[~np.broadcast_to(box_mask[:, None, :], (t, v, n))] = 0.0
    traj = np.tile(np.eye(4, dtype=np.float32), (t, 1, 1))
    traj[:, 1, 3] = np.arange(t, dtype=np.float32) * 0.5  # drives forward (LiDAR +y)
    k = np.array([[width * 0.8, 0, width / 2], [0, width * 0.8, height / 2], [0, 0, 1]], np.float32)
    k_src = np.array([[1266.4, 0, 816.3], [0, 1266.4, 491.5], [0, 0, 1]], np.float32)   # 1600x900 originals
    g, cell_m = schema.bev_grid(height)
    bev = np.zeros((t, len(schema.MAP_CLASSES), g, g), bool)
    bev[:, 0, :, int(g * 0.4):int(g * 0.6)] = True  # a road straight ahead
    fill = np.zeros((t, v), bool)
    for ti, vi in filled:
        fill[ti, vi] = True
    meta = {
        "schema_version": schema.SCHEMA_VERSION, "pipeline_version": schema.PIPELINE_VERSION,
        "dataset": "synthetic", "split": split, "scene_token": f"tok-{scene_name}", "scene_name": scene_name,
        "start_frame": start, "num_frames": t, "fps": schema.FPS, "height": height, "width": width,
        "views": list(views), "timestamps_us": [1_000_000 + i * 83_333 for i in range(start, start + t)],
        "view_timestamps_us": [[1_000_000 + i * 83_333 + 7_000 * (j - 1) for j in range(v)]
                               for i in range(start, start + t)],
        "keyframes": [i % 6 == 0 for i in range(start, start + t)],
        "frames": [[f"sweeps/{vw}/{scene_name}_{i:04d}.jpg" for vw in views] for i in range(start, start + t)],
        "filled": np.argwhere(fill).tolist(), "bev": {"cells": g, "cell_m": cell_m},
        "source_size": [[1600, 900] for _ in views],
        "vae": {"name": "tiny-random", "scaling_factor": 1.15258426, "temporal_compression": 4,
                "spatial_compression": 8},
        "latent": "mean+std" if with_std else "mean",
        "caption": {"source": "dataset", "prompt_version": None, "model": None},
    }
    return {
        "key": schema.sample_key(scene_name, start, t, height, width),
        "meta": meta,
        "latent_mean": (rng.standard_normal(shape) * latent_scale).astype(np.float16),
        "latent_std": (np.abs(rng.standard_normal(shape)) * 0.1).astype(np.float16) if with_std else None,
        "boxes": boxes, "view_boxes": view_boxes, "box_mask": box_mask,
        "box_view_mask": np.broadcast_to(box_mask[:, None, :], (t, v, n)).copy(),
        "box_class": (np.arange(n) % len(schema.OBJECT_CLASSES)).astype(np.int8),
        "box_track": np.arange(n, dtype=np.int32),
        "intrinsics": np.tile(k, (v, 1, 1)), "source_intrinsics": np.tile(k_src, (v, 1, 1)),
        "cam2lidar": np.tile(np.eye(4, dtype=np.float32), (t, v, 1, 1)), "fill_mask": fill,
        "traj": traj, "bev": schema.pack_bev(bev), "caption": caption,
    }


def write_shards(out: Path, buckets: dict[tuple[int, int, int], int], split: str = "train",
                 per_shard: int = 4, seed: int = 0, **sample_kw) -> list[Path]:
    """Write `count` samples per (H, W, T) bucket into shards under out/{split}/{bucket}/; returns shard paths."""
    paths = []
    for (h, w, t), count in sorted(buckets.items()):
        samples = []
        for i in range(count):
            s = make_sample(scene_name=f"synth-{i // 3:04d}", start=(i % 3) * 20, num_frames=t, height=h,
                            width=w, seed=seed + 1000 * i + t, split=split, **sample_kw)
            samples.append((s["key"], schema.encode_sample(s)))
        samples.sort()
        for j in range(0, len(samples), per_shard):
            p = Path(out) / schema.shard_path(split, h, w, t, j // per_shard)
            write_shard(p, samples[j:j + per_shard])
            paths.append(p)
    return paths
