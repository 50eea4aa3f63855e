"""mdv2-export-nuscenes: one generation of every clip written back into a nuScenes dataroot.

    mdv2-export-nuscenes --generated GEN --dataroot NUSCENES --out ROOT [--generation 0]

ROOT is a nuScenes dataroot whose tables are the source's (linked, byte-identical) and in which
every camera image a generated clip covers (keyframes and sweeps: the manifest's source_frames)
is the generated frame, brought back to the camera's original size by undoing the pipeline's
resize and top crop (train/eval/uncrop.py: the cropped rows black, as the authors pad them), saved
as JPEG under the original file name. Every other file or folder is a symbolic link to the source
(train/eval/linktree.py says why; ``--link hardlink`` links files instead). Any nuScenes
perception model (BEVFormer, BEVFusion, StreamPETR) runs on ROOT unchanged. A nuScenes root holds
one image per sample_data, so one root holds one generation (``--generation``; export each of the
4 into its own root and average the scores, as the paper does).

ROOT/eval_tokens.json lists the keyframe samples whose every camera image is generated and lies
in the first ``--eval-frames`` (16) frames of its clip: score exactly those (the W-CODA protocol:
the keyframes inside each 16-frame clip). ROOT/export.json records what was written. A rerun with
the same arguments completes an interrupted export (each JPEG is written to a temporary name and
renamed). Which frame fills a file that two frames name: a frame whose own exposure it is beats a
repaired drop (fill_mask), an earlier clip key beats a later one (overlapping clips).

Exit codes: 0 done; 2 a user mistake (one error: line).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.contract import cli
from train.eval import linktree, nusc_index, uncrop
from train.eval.generated import Generation, read_clip_list, read_frames, read_manifest, select

MARKER = "export.json"
EVAL_TOKENS = "eval_tokens.json"


@dataclass
class ExportConfig:
    generated: str
    dataroot: str
    out: str
    generation: int = 0
    version: str | None = None
    clips: list[str] | None = None
    eval_frames: int = 16
    jpeg_quality: int = 95
    top_rows: str = "black"
    link: str = "symlink"
    workers: int = 4
    progress: bool = True

    def identity(self) -> dict:
        """What makes two exports the same (a rerun into the same ROOT must match)."""
        d = asdict(self)
        for k in ("workers", "progress", "out"):
            d.pop(k)
        d["generated"], d["dataroot"] = os.path.realpath(self.generated), os.path.realpath(self.dataroot)
        return d


@dataclass(frozen=True)
class Claim:
    """Generated frame (clip, t, view) that fills one source image."""
    filled: bool        # a repaired drop: the image is a neighbour's, weaker than the frame of its own exposure
    key: str
    t: int
    view: str


def plan(rows: list[Generation]) -> tuple[dict[str, Claim], int]:
    """Source image -> the generated frame written there; and how many frames lost a file to a stronger claim."""
    claims: dict[str, Claim] = {}
    lost = 0
    for g in rows:                                  # sorted by key
        for t in range(g.num_frames):
            for j, view in enumerate(g.views):
                c = Claim(g.fill_mask[t][j], g.key, t, view)
                rel = g.source_frames[t][j]
                old = claims.get(rel)
                if old is None or (c.filled, c.key, c.t) < (old.filled, old.key, old.t):
                    if old is not None:
                        lost += 1
                    claims[rel] = c
                else:
                    lost += 1
    return claims, lost


def eval_tokens(index: nusc_index.CameraIndex, claims: dict[str, Claim], eval_frames: int) -> dict[str, list[str]]:
    """clip key -> keyframe sample tokens (in frame order) whose every camera image is that clip's generated
    frame within its first ``eval_frames`` frames."""
    out: dict[str, list[tuple[int, str]]] = {}
    for sample, images in index.keyframes.items():
        cs = [claims.get(f) for f in images.values()]
        if any(c is None or c.filled for c in cs) or len({c.key for c in cs}) != 1:
            continue
        if max(c.t for c in cs) < eval_frames:
            out.setdefault(cs[0].key, []).append((min(c.t for c in cs), sample))
    return {k: [s for _, s in sorted(v)] for k, v in sorted(out.items())}


def _write_image(cfg: ExportConfig, g: Generation, claim: Claim, rel: str) -> bool:
    dst = os.path.join(cfg.out, rel)
    if os.path.isfile(dst) and not os.path.islink(dst):
        return False                                   # written by an interrupted run (renamed only when whole)
    src = os.path.join(cfg.dataroot, rel)
    with Image.open(src) as im:
        size = im.size
        original = np.asarray(im.convert("RGB")) if cfg.top_rows == "real" else None
    want = tuple(g.source_size[g.view_index(claim.view)])
    if size != want:
        raise cli.BadInput(f"source image {src} is {size[0]}x{size[1]}, the manifest says {want[0]}x{want[1]} for "
                           f"clip {g.key} {claim.view}: --dataroot is not the dataset the clips were built from")
    frame = read_frames(cfg.generated, g, claim.view, [claim.t])[0]
    full = uncrop.restore(frame, size, cfg.top_rows, original)     # (H0, W0, 3)
    tmp = f"{dst}.{os.getpid()}.tmp"
    Image.fromarray(full).save(tmp, format="JPEG", quality=cfg.jpeg_quality, subsampling=0)
    os.replace(tmp, dst)
    return True


def _check_out(cfg: ExportConfig) -> None:
    out, src = os.path.realpath(cfg.out), os.path.realpath(cfg.dataroot)
    if out == src or out.startswith(src + os.sep) or src.startswith(out + os.sep):
        raise cli.BadInput(f"--out {cfg.out} and --dataroot {cfg.dataroot} overlap; the export must be a new folder")
    marker = os.path.join(cfg.out, MARKER)
    if os.path.isdir(cfg.out) and os.listdir(cfg.out):
        if not os.path.isfile(marker):
            raise cli.BadInput(f"--out {cfg.out} exists and is not an export of this command; use a new folder")
        with open(marker, encoding="utf-8") as f:
            prev = json.load(f).get("config")
        if prev != cfg.identity():
            raise cli.BadInput(f"--out {cfg.out} holds an export with other arguments ({MARKER}); use a new folder "
                               "or the same arguments to complete it")


def export(cfg: ExportConfig) -> dict:
    if not 1 <= cfg.jpeg_quality <= 100:
        raise cli.BadInput(f"--jpeg-quality {cfg.jpeg_quality} must be in 1..100")
    rows = select(read_manifest(cfg.generated), cfg.clips, [cfg.generation],
                  where=f"{cfg.generated}/manifest.parquet")
    version = nusc_index.find_version(cfg.dataroot, cfg.version)
    cfg.version = version
    claims, lost = plan(rows)
    for rel in claims:
        if not os.path.isfile(os.path.join(cfg.dataroot, rel)):
            raise cli.InputNotFound(f"real frame {os.path.join(cfg.dataroot, rel)} is missing: --dataroot must be "
                                    "the nuScenes root the clips were built from")
    _check_out(cfg)
    index = nusc_index.read(cfg.dataroot, version, set(claims))
    tokens = eval_tokens(index, claims, cfg.eval_frames)
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, MARKER), "w", encoding="utf-8") as f:   # first: a rerun knows the folder
        json.dump({"config": cfg.identity(), "complete": False}, f, indent=2)
    links = linktree.build(cfg.dataroot, cfg.out, set(claims), cfg.link, skip={MARKER, EVAL_TOKENS})
    by_key = {g.key: g for g in rows}
    work = sorted(claims.items())
    with ThreadPoolExecutor(max(1, cfg.workers)) as pool:
        written = sum(tqdm(pool.map(lambda kv: _write_image(cfg, by_key[kv[1].key], kv[1], kv[0]), work),
                           total=len(work), desc="export", unit="image", disable=not cfg.progress,
                           dynamic_ncols=True))
    samples = [s for v in tokens.values() for s in v]
    with open(os.path.join(cfg.out, EVAL_TOKENS), "w", encoding="utf-8") as f:
        json.dump({"version": version, "generation": cfg.generation, "eval_frames": cfg.eval_frames,
                   "sample_tokens": samples, "clips": tokens}, f, indent=2)
        f.write("\n")
    summary = {"config": cfg.identity(), "complete": True, "clips": len(rows), "replaced_images": len(claims),
               "written_now": int(written), "frames_not_written": lost, "links": links,
               "eval_samples": len(samples), "link_mode": cfg.link}
    with open(os.path.join(cfg.out, MARKER), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    return summary


def build_parser() -> argparse.ArgumentParser:
    ap = cli.ArgumentParser(prog="mdv2-export-nuscenes", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generated", required=True, help="the --out folder of mdv2-generate (manifest.parquet)")
    ap.add_argument("--dataroot", required=True, help="the nuScenes root the clips were built from")
    ap.add_argument("--out", required=True, help="the new dataroot to write (a new folder, or an interrupted export)")
    ap.add_argument("--generation", type=int, default=0, help="which generation goes into this root (default 0)")
    ap.add_argument("--version", help="table folder, e.g. v1.0-trainval (default: the only one in the dataroot)")
    ap.add_argument("--clips", help="text file of clip keys to export, one a line (default: all of the manifest)")
    ap.add_argument("--eval-frames", type=int, default=16,
                    help="eval_tokens.json: keyframes within the first N frames of a clip (default 16)")
    ap.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality of replaced images (default 95, 4:4:4)")
    ap.add_argument("--top-rows", choices=uncrop.TOP_ROWS, default="black",
                    help="the rows the pipeline cropped: black as the authors pad them, or the real image's "
                         "(default black)")
    ap.add_argument("--link", choices=linktree.MODES, default="symlink",
                    help="how unchanged files are linked (default symlink; hardlink needs one filesystem)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="threads writing JPEGs")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


@cli.entry
def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.eval_frames < 1:
        raise cli.BadInput("--eval-frames must be >= 1")
    cfg = ExportConfig(generated=a.generated, dataroot=a.dataroot, out=a.out, generation=a.generation,
                       version=a.version, clips=read_clip_list(a.clips) if a.clips else None,
                       eval_frames=a.eval_frames, jpeg_quality=a.jpeg_quality, top_rows=a.top_rows, link=a.link,
                       workers=a.workers, progress=not a.no_progress)
    s = export(cfg)
    print(f"{a.out}: {s['clips']} clips (generation {a.generation}), {s['replaced_images']} images replaced "
          f"({s['written_now']} written now), {s['links']} links, {s['eval_samples']} samples in {EVAL_TOKENS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
