"""Capacity plan: what a build will make and cost, before it starts (nothing decoded or encoded).

    mdv2-plan --config stage1 --dataroot /data/nuscenes --version v1.0-trainval [--out OUT] [--json PLAN.json]

For the dataroot's scenes and the stage's buckets it prints clips and samples per bucket, shards,
bytes on disk (and those of the BEV maps: the 400 x 400 grids of the buckets from 424 rows are 4x the
200 x 200 ones), VAE TFLOPs, GPU-hours and decode CPU-hours, then the yield of every bucket: clips
possible on the scenes' length, kept, repaired (holding a dropped image filled from the same camera's
nearest round), lost and why, with a warning line for each bucket that would be empty or keep less
than 10 % of its possible clips (pipeline/scenes/clipyield.py). How:
- tables: the per-scene table index (pipeline/scenes/tableindex.py; under --out it is the one the build
  reuses), then each scene's 12 Hz timeline by the build's own code (pipeline/scenes/nuscenes.py) and the
  clips by the build's own ``make_clip_index`` and ``plan_shards``, so clip and shard counts are the
  build's (all clips assumed captioned; frame files are not stat'ed unless --check-files);
- bytes: every member of ``schema.MEMBERS`` at its dtype and shape, plus tar and .npy headers;
  N per clip = the scene's detection-class
  objects whose annotated span overlaps the clip;
- VAE: ``FLOP_PER_PIXEL_FRAME`` (bench/encode.py, FlopCounterMode on CogVideoX-2b's VAE) x every
  encoded pixel-frame (T x V x H x W per clip; latent reuse across overlapping clips not subtracted),
  GPU-hours at --gpu-peak-tflops x --gpu-efficiency;
- decode: every source frame a (scene, resolution) needs, at --decode-fps-per-core (docs/build.md:
  314 frames/s per core at 424x800 with draft decoding), scaled by output pixels.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from pipeline.contract import cli, schema
from pipeline.scenes.clipyield import YieldReport
from pipeline.scenes.nuscenes import check_tables

FLOP_PER_PIXEL_FRAME = 9.26e6      # bench/encode.py flop_per_pixel_frame() on the CogVideoX-2b VAE
DECODE_FPS_PER_CORE = 314.0        # docs/build.md, 424x800, draft decoding
DECODE_REF_PIXELS = 424 * 800
TAR_BLOCK = 512
NPY_HEADER = 128


@dataclass
class PlanConfig:
    stage: str
    dataroot: str
    version: str
    out: str | None = None             # where the table index goes (the build's --out reuses it); None = temp
    samples_per_shard: int = 8
    store_std: bool = True
    gpu_peak_tflops: float = 989.0     # H100 SXM dense bf16
    gpu_efficiency: float = 0.4        # fraction of peak the encoder reaches
    decode_fps_per_core: float = DECODE_FPS_PER_CORE
    workers: int = 1
    check_files: bool = False
    limit_scenes: int | None = None
    max_fill_run: int | None = None    # None: the stage config's (default 2)
    progress: bool = True


@dataclass
class BucketPlan:
    clips: int = 0
    samples: int = 0
    shards: int = 0
    bytes: int = 0                     # with the member table of this checkout
    bev_bytes: int = 0                 # of which bev.npy (G x G bit-packed, G of the bucket)
    pixel_frames: int = 0              # encoded
    decode_frames: int = 0             # source frames (x views) its clips need; shared per resolution


@dataclass
class Plan:
    scenes: int
    buckets: dict[str, BucketPlan]
    tflops: float
    gpu_hours: float
    decode_cpu_hours: float
    seconds: float
    assumptions: dict = field(default_factory=dict)
    yield_report: dict = field(default_factory=dict)   # clipyield.YieldReport.as_dict()

    @property
    def total(self) -> BucketPlan:
        t = BucketPlan()
        for b in self.buckets.values():
            for k in asdict(t):
                setattr(t, k, getattr(t, k) + getattr(b, k))
        return t

    def text(self) -> str:
        lines = [f"{'bucket':<22}{'clips':>9}{'samples':>9}{'shards':>8}{'GB':>10}{'BEV GB':>9}{'grid':>6}"
                 f"{'Gpix-frames':>13}{'decoded':>10}"]
        for name, b in list(sorted(self.buckets.items())) + [("total", self.total)]:
            grid = str(schema.bev_grid(int(name.split("x")[0]))[0]) if name != "total" else ""
            lines.append(f"{name:<22}{b.clips:>9}{b.samples:>9}{b.shards:>8}{b.bytes / 1e9:>10.3f}"
                         f"{b.bev_bytes / 1e9:>9.3f}{grid:>6}{b.pixel_frames / 1e9:>13.2f}{b.decode_frames:>10}")
        lines.append(bev_cost_line(self.buckets))
        a = self.assumptions
        lines.append(f"scenes {self.scenes}; VAE {self.tflops:,.1f} TFLOP -> {self.gpu_hours:.3g} GPU-hours at "
                     f"{a['gpu_efficiency']:.0%} of {a['gpu_peak_tflops']:g} TFLOP/s; decode "
                     f"{self.decode_cpu_hours:.3g} CPU-hours at {a['decode_fps_per_core']:g} frames/s per core "
                     f"(424x800); planned in {self.seconds:.1f} s")
        if self.yield_report:
            lines += [""] + YieldReport.from_dict(self.yield_report).lines()
        return "\n".join(lines)


def bev_cost_line(buckets: dict[str, BucketPlan]) -> str:
    """What the 400 x 400 BEV grids cost: 4x the bytes per frame of the 200 x 200 ones, still bit-packed."""
    big = {n: b for n, b in buckets.items() if schema.bev_grid(int(n.split("x")[0]))[0] == schema.BEV_LARGE_CELLS}
    total, bev = sum(b.bytes for b in buckets.values()), sum(b.bev_bytes for b in buckets.values())
    per = {g: len(schema.MAP_CLASSES) * g * schema.bev_packed_cols(g) for g, _ in schema.BEV_GRIDS}
    return (f"BEV maps, bit-packed: {per[schema.BEV_CELLS] / 1e3:g} kB per frame at {schema.BEV_CELLS}x"
            f"{schema.BEV_CELLS} x {schema.BEV_RESOLUTION_M} m, {per[schema.BEV_LARGE_CELLS] / 1e3:g} kB (4x) at "
            f"{schema.BEV_LARGE_CELLS}x{schema.BEV_LARGE_CELLS} x {schema.BEV_LARGE_RESOLUTION_M} m (buckets from "
            f"{schema.BEV_LARGE_MIN_HEIGHT} rows: {len(big)} here, {sum(b.bev_bytes for b in big.values()) / 1e9:.3f}"
            f" GB); all BEV {bev / 1e9:.3f} GB = {bev / max(total, 1):.1%} of the shards")


def _member_bytes(dims: dict, store_std: bool, only: str | None = None) -> int:
    shapes = {m.name: (m.dtype, m.shape) for m in schema.MEMBERS if m.dtype is not None}
    total = 0
    for name, (dtype, shape) in shapes.items():
        if (name == "latent_std.npy" and not store_std) or (only and name != only):
            continue
        n = np.dtype(dtype).itemsize * math.prod(shape(dims)) + NPY_HEADER
        total += TAR_BLOCK + -(-n // TAR_BLOCK) * TAR_BLOCK
    return total


def _meta_bytes(t: int, v: int, path_len: float) -> int:
    """meta.json + caption.txt: T x V frame paths and timestamps dominate; ~1.5 KB of fixed fields."""
    n = int(t * v * (path_len + 4) + t * (v + 1) * 18 + t * 7 + 1500)
    return 2 * TAR_BLOCK + -(-n // TAR_BLOCK) * TAR_BLOCK + TAR_BLOCK


def scene_facts(index: str, dataroot: str, scene_name: str, check_files: bool = False) -> dict:
    """What the plan needs of one scene: timeline flags and the frame span of each detection-class object."""
    from pipeline.scenes.nuscenes import build_timeline, scene_split
    from pipeline.scenes.tableindex import SceneTables
    nusc = SceneTables(index, scene_name, dataroot)
    tl = build_timeline(nusc, scene_name, check_files=check_files)
    frame_of = {s: i for i, s in enumerate(tl.sample_tokens) if s}
    spans: dict[str, list[int]] = {}
    for s, f in frame_of.items():
        for tok in nusc.get("sample", s)["anns"]:
            a = nusc.get("sample_annotation", tok)
            if a["category_name"] in schema.NUSCENES_CATEGORY_TO_CLASS:
                lo, hi = spans.get(a["instance_token"], (f, f))
                spans[a["instance_token"]] = [min(lo, f), max(hi, f)]
    paths = [p for p in tl.frame_paths.ravel() if p]
    return {"scene_name": scene_name, "scene_token": tl.scene_token, "split": scene_split(nusc.version, scene_name),
            "views": tl.views, "image_size": tl.image_size, "keyframe": tl.keyframe, "frame_ok": tl.frame_ok,
            "fill_from": tl.fill_from, "gap": tl.gap,
            "spans": np.array(sorted(spans.values()), np.int32).reshape(-1, 2),
            "path_len": float(np.mean([len(p) for p in paths])) if paths else 60.0}


class _Scene:
    """Just what make_clip_index reads of a SceneArrays."""

    def __init__(self, f: dict, version: str):
        self.scene_name, self.scene_token, self.split = f["scene_name"], f["scene_token"], f["split"]
        self.dataset, self.views, self.image_size = version, f["views"], tuple(f["image_size"])
        self.keyframe, self.frame_ok = f["keyframe"], f["frame_ok"]
        self.fill_from, self.gap = f["fill_from"], f["gap"]
        self.num_frames = int(self.keyframe.shape[0])
        self.frame_paths = np.empty((self.num_frames, 0), object)   # the clips' path lists are not needed


def _facts_star(args):
    return scene_facts(*args)


class _Serial:
    """ProcessPoolExecutor's map in this process (--workers 1)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, items, chunksize=1):
        return map(fn, items)


def make_plan(cfg: PlanConfig) -> Plan:
    from dataclasses import replace
    from tqdm import tqdm
    from pipeline.scenes.buckets import load_stage, make_clip_index
    from pipeline.scenes.tableindex import PER_SCENE, WHOLE, ensure_table_index, scene_names
    from pipeline.shards.write import ClipRef, plan_shards
    t0 = time.perf_counter()
    stage = load_stage(cfg.stage)
    if cfg.max_fill_run is not None:
        stage = replace(stage, max_fill_run=cfg.max_fill_run)
    tmp = None
    if cfg.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="mdv2-plan-")
    try:
        with tqdm(total=len(PER_SCENE + WHOLE), desc="table index", unit="table", disable=not cfg.progress,
                  file=sys.stderr) as bar:
            def tick(name: str) -> None:
                bar.update(1)
                bar.set_postfix_str(name)
            index = ensure_table_index(cfg.dataroot, cfg.version, cfg.out or tmp.name, progress=tick)
        names = sorted(scene_names(index))[:cfg.limit_scenes or None]
        jobs = [(index, cfg.dataroot, n, cfg.check_files) for n in names]
        with tqdm(total=len(jobs), desc="scene timelines", unit="scene", disable=not cfg.progress,
                  file=sys.stderr) as bar:
            facts = []
            with ProcessPoolExecutor(cfg.workers) if cfg.workers > 1 else _Serial() as pool:
                for f in pool.map(_facts_star, jobs, chunksize=8):
                    facts.append(f)
                    bar.update(1)
    finally:
        if tmp is not None:
            tmp.cleanup()
    by_name = {f["scene_name"]: f for f in facts}
    report = YieldReport()
    clips = make_clip_index([_Scene(f, cfg.version) for f in facts], stage, report=report).to_pylist()
    refs = [ClipRef(c["key"], c["split"], c["scene_name"], c["start"], c["num_frames"], c["height"], c["width"])
            for c in clips]
    shards = plan_shards(refs, cfg.samples_per_shard)
    buckets: dict[str, BucketPlan] = {b.name: BucketPlan() for b in stage.buckets}
    decode: dict[tuple, set] = {}      # (scene, H, W) -> source frames: decoded once per resolution, as the build
    need: dict[tuple, set] = {}        # (scene, bucket) -> source frames
    for c in clips:
        f = by_name[c["scene_name"]]
        t, v, h, w, s = c["num_frames"], len(f["views"]), c["height"], c["width"], c["start"]
        sp = f["spans"]
        n = int(np.count_nonzero((sp[:, 0] < s + t) & (sp[:, 1] >= s)))
        dims = {"V": v, "T": t, "Tl": schema.latent_frames(t), "N": n, "H": h, "W": w, "G": schema.bev_grid(h)[0]}
        b = buckets.setdefault(c["bucket"], BucketPlan())
        b.clips += 1
        b.samples += 1
        meta = _meta_bytes(t, v, f["path_len"])
        b.bytes += _member_bytes(dims, cfg.store_std) + meta
        b.bev_bytes += _member_bytes(dims, cfg.store_std, only="bev.npy")
        b.pixel_frames += t * v * h * w
        decode.setdefault((c["scene_name"], h, w), set()).update(range(s, s + t))
        need.setdefault((c["scene_name"], c["bucket"]), set()).update(range(s, s + t))
    for (scene, bucket), frames in need.items():
        buckets[bucket].decode_frames += len(frames) * len(by_name[scene]["views"])
    bucket_of = {c["key"]: c["bucket"] for c in clips}   # a "full" clip's shard is named by its actual T
    for p in shards:
        b = buckets[bucket_of[p.clips[0].key]]
        b.shards += 1
        b.bytes += 2 * TAR_BLOCK * 10     # tar end-of-archive blocks (and padding to 10 KiB)
    px = sum(b.pixel_frames for b in buckets.values())
    tflop = px * FLOP_PER_PIXEL_FRAME / 1e12
    dec_s = sum(len(frames) * len(by_name[scene]["views"]) * h * w / DECODE_REF_PIXELS / cfg.decode_fps_per_core
                for (scene, h, w), frames in decode.items())
    return Plan(scenes=len(facts), buckets=buckets, tflops=tflop,
                gpu_hours=tflop / (cfg.gpu_peak_tflops * cfg.gpu_efficiency) / 3600,
                decode_cpu_hours=dec_s / 3600, seconds=time.perf_counter() - t0,
                assumptions={"gpu_peak_tflops": cfg.gpu_peak_tflops, "gpu_efficiency": cfg.gpu_efficiency,
                             "decode_fps_per_core": cfg.decode_fps_per_core,
                             "flop_per_pixel_frame": FLOP_PER_PIXEL_FRAME, "samples_per_shard": cfg.samples_per_shard,
                             "latent": "mean+std" if cfg.store_std else "mean", "captions": "every clip",
                             "files_checked": cfg.check_files, "schema": schema.SCHEMA_VERSION,
                             "max_fill_run": stage.max_fill_run},
                yield_report=report.as_dict())


@cli.entry
def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="mdv2-plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="stage name (pipeline/configs/stages/NAME.yaml) or a yaml path")
    p.add_argument("--dataroot", required=True, help="nuScenes root (holds VERSION/ and maps/)")
    p.add_argument("--version", default="v1.0-trainval", help="table folder under the dataroot")
    p.add_argument("--out", help="the build's --out: the table index is written there and reused by the build "
                                 "(default: a temporary folder)")
    p.add_argument("--samples-per-shard", type=int, default=8, help="as mdv2-build (decides the shard count)")
    p.add_argument("--mean-only", action="store_true", help="as mdv2-build: no latent_std member")
    p.add_argument("--gpu-peak-tflops", type=float, default=989.0, help="peak of one GPU (default 989, H100 bf16)")
    p.add_argument("--gpu-efficiency", type=float, default=0.4, help="fraction of that peak the VAE reaches (0.4)")
    p.add_argument("--decode-fps-per-core", type=float, default=DECODE_FPS_PER_CORE,
                   help="JPEG decode frames/s per core at 424x800 (default: measured, docs/build.md)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes reading scene timelines")
    p.add_argument("--check-files", action="store_true", help="stat every frame file as the build does (slower)")
    p.add_argument("--limit-scenes", type=int, help="first N scenes (sorted by name) only")
    p.add_argument("--max-fill-run", type=int, help="override the stage's max_fill_run: the most consecutive "
                                                    "dropped images of one view a clip may hold, repaired (default: "
                                                    "the stage config's, 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (stderr)")
    p.add_argument("--json", help="also write the plan as JSON to this path")
    a = p.parse_args(argv)
    if not 0 < a.gpu_efficiency <= 1 or a.gpu_peak_tflops <= 0 or a.decode_fps_per_core <= 0:
        p.error("--gpu-efficiency must be in (0, 1]; --gpu-peak-tflops and --decode-fps-per-core must be > 0")
    cfg = PlanConfig(stage=a.config, dataroot=a.dataroot, version=a.version, out=a.out,
                     samples_per_shard=a.samples_per_shard, store_std=not a.mean_only,
                     gpu_peak_tflops=a.gpu_peak_tflops, gpu_efficiency=a.gpu_efficiency,
                     decode_fps_per_core=a.decode_fps_per_core, workers=max(1, a.workers),
                     check_files=a.check_files, limit_scenes=a.limit_scenes, max_fill_run=a.max_fill_run,
                     progress=not a.no_progress)
    if a.max_fill_run is not None and a.max_fill_run < 0:
        p.error("--max-fill-run must be >= 0")
    check_tables(a.dataroot, a.version)   # a wrong --dataroot / --version: one line, before any work
    plan = make_plan(cfg)
    print(plan.text())
    if a.json:
        with open(a.json, "w") as f:
            json.dump(asdict(plan) | {"total": asdict(plan.total)}, f, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
