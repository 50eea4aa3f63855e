"""Reading an ``mdv2-generate`` folder (INTERFACES.md E): its manifest and the generated frames.

    {out}/manifest.parquet                            one row per (clip key, generation g)
    {out}/{dir}/frames/{VIEW}/{t:03d}.png             the generated frames, lossless, H x W

Everything the evaluation needs about the real clip travels in the row: ``source_frames``
(T x V dataroot-relative paths, the images the clip was made from; a repaired drop names the
neighbouring image actually used), ``source_size`` (each view's original W x H), ``views``.
Problems are the user's (one line each): no manifest, a column missing, two generations of a
clip that disagree about its source frames, a clip list naming a key the manifest lacks, a
generation folder with a frame missing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.contract import cli
from pipeline.contract.manifest import read_table

MANIFEST = "manifest.parquet"
COLUMNS = ("key", "generation", "seed", "num_frames", "height", "width", "views", "source_frames",
           "source_size", "fill_mask", "dir")
FRAME_TEMPLATE = "frames/{view}/{t:03d}.png"     # relative to the generation folder ({out}/{dir})
KEYFRAME_DIR = "samples/"                       # nuScenes: keyframe images live under samples/, sweeps under sweeps/


@dataclass(frozen=True)
class Generation:
    """One manifest row: generation ``generation`` of clip ``key``."""
    key: str
    generation: int
    seed: int
    num_frames: int
    height: int
    width: int
    views: tuple[str, ...]
    source_frames: tuple[tuple[str, ...], ...]   # (T, V) dataroot-relative
    source_size: tuple[tuple[int, int], ...]     # (V,) (W, H) of each camera's original images
    fill_mask: tuple[tuple[bool, ...], ...]      # (T, V) True = repaired drop (a neighbour's image)
    dir: str                                     # the generation folder, relative to the generated root

    def frame_file(self, root: str, view: str, t: int) -> str:
        return os.path.join(root, self.dir, FRAME_TEMPLATE.format(view=view, t=t))

    def view_index(self, view: str) -> int:
        return self.views.index(view)

    def is_keyframe(self, t: int, view: str) -> bool:
        return self.source_frames[t][self.view_index(view)].startswith(KEYFRAME_DIR)


def _row(r: dict, where: str) -> Generation:
    t, views = int(r["num_frames"]), tuple(r["views"])
    frames = tuple(tuple(row) for row in r["source_frames"])
    fill = tuple(tuple(bool(b) for b in row) for row in r["fill_mask"])
    size = tuple((int(s[0]), int(s[1])) for s in r["source_size"])
    if len(frames) != t or any(len(row) != len(views) for row in frames):
        raise cli.BadInput(f"{where}: clip {r['key']} generation {r['generation']}: source_frames is not "
                           f"{t} x {len(views)} (num_frames x views); the manifest is damaged, rerun mdv2-generate")
    if len(size) != len(views) or len(fill) != t or any(len(row) != len(views) for row in fill):
        raise cli.BadInput(f"{where}: clip {r['key']} generation {r['generation']}: source_size / fill_mask do "
                           f"not match its {len(views)} views and {t} frames; rerun mdv2-generate")
    return Generation(str(r["key"]), int(r["generation"]), int(r["seed"]), t, int(r["height"]), int(r["width"]),
                      views, frames, size, fill, str(r["dir"]))


def read_manifest(root: str) -> list[Generation]:
    """All rows of ROOT/manifest.parquet, sorted by (key, generation)."""
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        raise cli.InputNotFound(f"--generated {root}: no {MANIFEST} there; pass the --out folder of mdv2-generate")
    table = read_table(path)
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise cli.BadInput(f"{path}: columns {missing} are missing; this is not an mdv2-generate manifest")
    rows = [_row(r, path) for r in table.select(list(COLUMNS)).to_pylist()]
    rows.sort(key=lambda g: (g.key, g.generation))
    seen = set()
    for g in rows:
        if (g.key, g.generation) in seen:
            raise cli.BadInput(f"{path}: clip {g.key} generation {g.generation} is listed twice")
        seen.add((g.key, g.generation))
    if not rows:
        raise cli.BadInput(f"{path} lists no generations; run mdv2-generate first")
    return rows


def read_clip_list(path: str) -> list[str]:
    """Keys, one a line (blank lines and # comments ignored)."""
    if not os.path.isfile(path):
        raise cli.InputNotFound(f"--clips {path} does not exist (a text file with one clip key a line)")
    with open(path, encoding="utf-8") as f:
        keys = [ln.split("#", 1)[0].strip() for ln in f]
    keys = [k for k in keys if k]
    if not keys:
        raise cli.BadInput(f"--clips {path} lists no clip keys")
    return keys


def select(rows: list[Generation], clips: list[str] | None = None, generations: list[int] | None = None,
           where: str = "the manifest") -> list[Generation]:
    """The rows of exactly these clips (every listed key must be there) and generations (each clip must have all)."""
    by_key: dict[str, list[Generation]] = {}
    for g in rows:
        by_key.setdefault(g.key, []).append(g)
    if clips is not None:
        absent = [k for k in dict.fromkeys(clips) if k not in by_key]
        if absent:
            raise cli.BadInput(f"the clip list and {where} do not match: {len(absent)} listed clips have no "
                               f"generation, first {absent[0]!r}; generate them or fix the list")
        by_key = {k: by_key[k] for k in sorted(set(clips))}
    out = []
    for key, gens in by_key.items():
        have = {g.generation: g for g in gens}
        if generations is not None:
            lacking = [i for i in generations if i not in have]
            if lacking:
                raise cli.BadInput(f"clip {key} has no generation {lacking[0]} in {where} (it has "
                                   f"{sorted(have)}); pass --generation with the ones that exist")
            gens = [have[i] for i in generations]
        first = gens[0]
        for g in gens[1:]:
            if (g.source_frames, g.views, g.height, g.width) != (first.source_frames, first.views, first.height,
                                                                  first.width):
                raise cli.BadInput(f"{where}: clip {key}: generations {first.generation} and {g.generation} "
                                   "disagree about the source frames, views or size; the folder mixes two runs")
        out.extend(gens)
    return out


def real_clips(rows: list[Generation]) -> list[Generation]:
    """One row per clip key (the real clip is the same for every generation; ``select`` checked it)."""
    first: dict[str, Generation] = {}
    for g in rows:
        first.setdefault(g.key, g)
    return [first[k] for k in sorted(first)]


def check_complete(root: str, rows: list[Generation], indices_of) -> None:
    """Every frame the evaluation reads exists; ``indices_of(row)`` gives the frames it needs."""
    for g in rows:
        for view in g.views:
            for t in indices_of(g):
                path = g.frame_file(root, view, t)
                if not os.path.isfile(path):
                    raise cli.InputNotFound(f"generated frame {path} is missing (clip {g.key} generation "
                                            f"{g.generation}); rerun mdv2-generate, it completes the folder")


def read_frames(root: str, g: Generation, view: str, indices: list[int]) -> np.ndarray:
    """(N, H, W, 3) uint8 generated frames of one view."""
    out = np.empty((len(indices), g.height, g.width, 3), np.uint8)
    for i, t in enumerate(indices):
        path = g.frame_file(root, view, t)
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as e:
            raise cli.BadInput(f"generated frame {path} cannot be read ({type(e).__name__}: {e})") from None
        if arr.shape[:2] != (g.height, g.width):
            raise cli.BadInput(f"generated frame {path} is {arr.shape[1]}x{arr.shape[0]}, the manifest says "
                               f"{g.width}x{g.height} for clip {g.key}")
        out[i] = arr
    return out
