"""mdv2-eval: FVD or FID of an mdv2-generate folder against the real frames of the same clips.

    mdv2-eval fvd --generated GEN --dataroot NUSCENES [--weights pretrained/i3d_pretrained_400.pt]
    mdv2-eval fid --generated GEN --dataroot NUSCENES [--weights pretrained/pt_inception-2015-12-05-6726825d.pth]

The real frames are the manifest's source_frames, read from the dataroot and brought to the
generated geometry by the pipeline's own resize and top crop; then both sides follow the protocol
(docs/eval.md section 2): FVD by default scores the first 16 frames, downsampled x0.25 (212x400 for
848x1600 clips), shorter side to 224 and the centre 224x224, with VideoGPT's I3D (400 logits);
FID scores the same frames at the generated size with pytorch-fid's InceptionV3 (2048-d).
Prints a table per view and overall and writes it as JSON (default GEN/eval_<metric>.json). Real
features are cached (default ~/.cache/mdv2-eval, or $MDV2_EVAL_CACHE): a second run against the
same real clips reads them back.

Exit codes: 0 done; 2 a user mistake (one error: line: a missing file, a wrong weights file, a clip
list that does not match the manifest, a missing real frame).
"""
from __future__ import annotations

import argparse
import os
import sys

from pipeline.contract import cli

DEFAULT_WEIGHTS = {"fvd": "pretrained/i3d_pretrained_400.pt", "fid": "pretrained/pt_inception-2015-12-05-6726825d.pth"}
DEFAULTS = {  # metric -> (frames, downsample, crop, batch)
    "fvd": (16, 0.25, 224, 8),
    "fid": (16, 1.0, 0, 32),
}


def _add(p: argparse.ArgumentParser, metric: str) -> None:
    frames, down, crop, batch = DEFAULTS[metric]
    p.add_argument("--generated", required=True, help="the --out folder of mdv2-generate (manifest.parquet)")
    p.add_argument("--dataroot", required=True, help="nuScenes root the source_frames paths are relative to")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS[metric],
                   help="network weights, a local state-dict file (default %(default)s)")
    p.add_argument("--clips", help="text file of clip keys to score, one a line (default: every clip of the "
                                   "manifest); every key must have its generations")
    p.add_argument("--generation", type=int, action="append", metavar="G",
                   help="score only generation G (repeatable; default: all of them)")
    p.add_argument("--views", help="comma-separated views (default: all)")
    p.add_argument("--frames", type=int, default=frames,
                   help="score the first N frames of each clip; 0 = all (default %(default)s: 17 generated -> 16)")
    p.add_argument("--downsample", type=float, default=down,
                   help="scale both sides by this (PIL bicubic) before the crop (default %(default)s)")
    p.add_argument("--crop", type=int, default=crop,
                   help="shorter side to N (bilinear), then the centre NxN; 0 = none (default %(default)s)")
    if metric == "fid":
        p.add_argument("--keyframes-only", action="store_true",
                       help="score only frames whose source image is a keyframe (samples/), as MagicDrive's FID")
    p.add_argument("--cache-dir", help="real-feature cache (default $MDV2_EVAL_CACHE or ~/.cache/mdv2-eval); "
                                       "'none' disables it")
    p.add_argument("--json", help="report file (default GENERATED/eval_%s.json)" % metric)
    p.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    p.add_argument("--batch-size", type=int, default=batch,
                   help=f"{'clips' if metric == 'fvd' else 'frames'} per network call (default %(default)s)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="threads decoding frames (default %(default)s)")
    p.add_argument("--no-draft", action="store_true",
                   help="decode real JPEGs at full size before resizing (the build's --no-draft)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    ap = cli.ArgumentParser(prog="mdv2-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="metric", required=True, metavar="{fvd,fid}")
    _add(sub.add_parser("fvd", help="Fréchet video distance (VideoGPT I3D)",
                        description="FVD per view and overall: the first 16 frames of every clip, real and generated, "
                                    "downsampled x0.25 (848x1600 -> 212x400), shorter side to 224, centre 224x224, "
                                    "VideoGPT's I3D logits (docs/eval.md section 2)."), "fvd")
    _add(sub.add_parser("fid", help="Fréchet inception distance (pytorch-fid InceptionV3)",
                        description="FID per view and overall: every scored frame (or keyframes only) at the "
                                    "generated size, pytorch-fid's InceptionV3 2048-d pool features "
                                    "(docs/eval.md section 2)."), "fid")
    return ap


def config_from_args(a: argparse.Namespace):
    from train.eval import cache
    from train.eval.evaluate import EvalConfig
    from train.eval.generated import read_clip_list
    from train.eval.protocol import Protocol
    protocol = Protocol(frames=a.frames or None, downsample=a.downsample, crop=a.crop or None,
                        keyframes_only=getattr(a, "keyframes_only", False))
    try:
        protocol.check()
    except ValueError as e:
        raise cli.BadInput(f"protocol: {e}") from None
    if a.batch_size < 1 or a.workers < 1:
        raise cli.BadInput("--batch-size and --workers must be >= 1")
    if a.device is None:
        import torch
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    cache_dir = None if (a.cache_dir or "").lower() == "none" else (a.cache_dir or cache.default_dir())
    return EvalConfig(
        metric=a.metric, generated=a.generated, dataroot=a.dataroot, weights=a.weights, protocol=protocol,
        clips=read_clip_list(a.clips) if a.clips else None, generations=a.generation,
        views=[v.strip() for v in a.views.split(",") if v.strip()] if a.views else None, cache_dir=cache_dir,
        device=a.device, batch=a.batch_size, workers=a.workers, draft=not a.no_draft, progress=not a.no_progress)


@cli.entry
def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from train.eval.evaluate import evaluate
    from train.eval.report import table, write_json
    cfg = config_from_args(a)
    report = evaluate(cfg)
    out = a.json or os.path.join(a.generated, f"eval_{a.metric}.json")
    write_json(out, report)
    print(table(report))
    print(f"report: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
