"""Generation folders in the format of ``mdv2-generate`` (INTERFACES.md E), made from a synthetic nuScenes
dataset's own images: each "generated" frame is the real source image brought to the clip's geometry by the
pipeline's resize + top crop, then passed through ``frame_fn`` (identity, added noise, a colour negative...).
So the truth is known: the FVD of an unchanged set against its real clips is ~0, and an exported image must
carry exactly the frame written here. Also tiny feature networks with the published key layout."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from pipeline.contract import schema
from pipeline.scenes.nuscenes import build_timeline, load_nuscenes
from pipeline.shards.frames import decode_resize_crop
from train.generate import MANIFEST_SCHEMA  # the product's manifest: a generated folder as mdv2-generate writes it


FrameFn = Callable[[np.ndarray, str, int, int, str], np.ndarray]   # (real H x W x 3, key, g, t, view) -> frame


def identity(real, key, g, t, view):
    return real


def noisy(sigma: float, seed: int = 0) -> FrameFn:
    """Gaussian pixel noise of std ``sigma`` (levels), seeded per (key, generation, frame, view)."""
    def fn(real, key, g, t, view):
        rng = np.random.default_rng([seed, g, t, schema.VIEWS.index(view), sum(map(ord, key))])
        return np.clip(real.astype(np.float32) + rng.normal(0, sigma, real.shape), 0, 255).round().astype(np.uint8)
    return fn


def negative(real, key, g, t, view):
    return 255 - real


@lru_cache(maxsize=16)
def _timeline(dataroot: str, version: str, scene: str, views: tuple[str, ...]):
    return build_timeline(load_nuscenes(dataroot, version), scene, views)


def clip_rows(dataroot: str, version: str, scene: str, start: int, num_frames: int, views=schema.VIEWS) -> dict:
    """Source frames, timestamps and sizes of one clip from the pipeline's own timeline."""
    tl = _timeline(dataroot, version, scene, tuple(views))
    sl = slice(start, start + num_frames)
    assert tl.frame_ok[sl].all(), "the test clip must be complete"
    return {"source_frames": tl.frame_paths[sl].tolist(), "timestamps_us": tl.timestamps_us[sl].tolist(),
            "view_timestamps_us": tl.view_timestamps_us[sl].tolist(),
            "source_size": [list(tl.image_size)] * len(views), "sample_tokens": tl.sample_tokens[sl]}


def write_generations(out: Path, dataroot: str, version: str, clips: list[tuple[str, int, int]], height: int,
                      width: int, generations: int = 1, views=schema.VIEWS, frame_fn: FrameFn = identity,
                      base_seed: int = 1024) -> list[dict]:
    """Write ``generations`` generations of each (scene, start, T) clip under ``out``; returns the manifest rows."""
    out = Path(out)
    rows = []
    for scene, start, t_len in clips:
        info = clip_rows(dataroot, version, scene, start, t_len, views)
        key = schema.sample_key(scene, start, t_len, height, width)
        for g in range(generations):
            rel = f"{key}/g{g:02d}"
            for j, view in enumerate(views):
                d = out / rel / "frames" / view
                d.mkdir(parents=True, exist_ok=True)
                for t in range(t_len):
                    real = decode_resize_crop(str(Path(dataroot) / info["source_frames"][t][j]), width, height)
                    Image.fromarray(frame_fn(real, key, g, t, view)).save(d / f"{t:03d}.png", compress_level=1)
            (out / rel / "sample.json").write_text(json.dumps({"key": key, "generation": g}))
            rows.append({
                "key": key, "generation": g, "seed": base_seed + g, "split": "val",
                "bucket": schema.bucket_name(height, width, t_len), "num_frames": t_len, "height": height,
                "width": width, "views": list(views), "source_frames": info["source_frames"],
                "timestamps_us": info["timestamps_us"], "view_timestamps_us": info["view_timestamps_us"],
                "source_size": info["source_size"], "fill_mask": [[False] * len(views)] * t_len, "dir": rel,
                "config": json.dumps({"steps": 30, "cfg_scale": 2.0, "frames": t_len}),
            })
    write_manifest(out, rows)
    return rows


def write_manifest(out: Path, rows: list[dict]) -> None:
    rows = sorted(rows, key=lambda r: (r["key"], r["generation"]))
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), Path(out) / "manifest.parquet")


def read_manifest_rows(out: Path) -> list[dict]:
    return pq.read_table(Path(out) / "manifest.parquet").to_pylist()


def tiny_weights(path: Path, metric: str, divisor: int, seed: int = 0, drop_counters: bool = True) -> Path:
    """A random network of the published key layout (narrower by ``divisor``) saved as a plain state dict.

    BatchNorm statistics are set away from (0, 1) so that a loader that skipped them would change the
    features. Without the num_batches_tracked counters, like the published files."""
    from train.eval.i3d import I3D
    from train.eval.inception import FIDInceptionV3
    torch.manual_seed(seed)
    model = I3D(divisor) if metric == "fvd" else FIDInceptionV3(divisor)
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            if not drop_counters:
                sd[k] = v
            continue
        if k.endswith("running_var"):
            v = torch.rand_like(v) + 0.5
        elif k.endswith("running_mean"):
            v = torch.randn_like(v) * 0.1
        elif v.dtype.is_floating_point and v.dim() > 1:
            v = torch.randn_like(v) * (2.0 / v[0].numel()) ** 0.5
        sd[k] = v.clone()
    torch.save(sd, path)
    return Path(path)


# ---- a shared evaluation set (import the fixture into a test module to use it) -----------------------------

EVAL_CLIPS = ((0, 0), (0, 30), (1, 5), (1, 40))    # (scene index, start frame) of the 17-frame test clips
EVAL_SIZE = (224, 400)                               # (H, W): the paper's smallest bucket (400x225 -> top row cropped)
TEST_VIEWS = ("CAM_FRONT", "CAM_BACK_LEFT")          # the metric tests score two views (each is scored on its own)


class EvalSet:
    def __init__(self, root: Path, synth):
        self.root, self.dataroot, self.version = Path(root), str(synth.root), synth.version
        self.clips = [(synth.scene_names[s], start, 17) for s, start in EVAL_CLIPS]
        self.gen = self.root / "gen"
        self.rows = write_generations(self.gen, self.dataroot, self.version, self.clips, *EVAL_SIZE)
        self.i3d = tiny_weights(self.root / "i3d_tiny.pt", "fvd", 16)
        self.inception = tiny_weights(self.root / "inception_tiny.pt", "fid", 16)

    def variant(self, name: str, frame_fn: FrameFn, generations: int = 1, clips=None, size=EVAL_SIZE,
                views=TEST_VIEWS) -> Path:
        out = self.root / name
        if not (out / "manifest.parquet").exists():
            write_generations(out, self.dataroot, self.version, clips or self.clips, *size, generations=generations,
                              frame_fn=frame_fn, views=views)
        return out


@pytest.fixture(scope="session")
def eval_set(synth_dataset, tmp_path_factory):
    """4 clips x 17 frames x 6 views at 224x400 whose generated frames are the real ones (lossless PNG), and tiny
    networks (I3D / 16, InceptionV3 / 16) saved like the published files."""
    return EvalSet(tmp_path_factory.mktemp("eval"), synth_dataset)
