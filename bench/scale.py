"""Scale: the scenes stage on a trainval-sized table set, memory per process flat in the data size.

    python bench/scale.py --data /tmp/tv [--counts 10 100 850] [--max-seconds 600] [--cpus 2]

--data is a table set from `mdv2-synth --out DIR --scenes 850 --seconds 20 --tables-only` (written
here when missing; ~15 min on 2 busy cores). The devkit is never loaded: the driver streams the
tables once into the per-scene index (pipeline/scenes/tableindex.py), then the real build's scenes stage
(pipeline.build._run_scenes, real local Ray) runs for each scene count in a fresh --out. A count
whose estimate (the last measured seconds/scene x count) exceeds --max-seconds is cut to the
largest count that fits, and reported as such. A 2-scene warm-up (worker start, imports) runs first.

Figures: seconds per scene per count (the scene tasks' phase; the index check and the map streaming,
once per driver, are reported apart) (and the ratio of the largest count to the 10-scene figure:
the baseline of the same run), peak RSS of the driver (ru_maxrss, incl. the index pass) and of the
busiest Ray worker of this driver's own Ray (sampled every 0.2 s), peak object-store bytes
(sampled every 1 s), the table-index pass, and the frame path at 848x1600 for a 20 s scene.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import save  # noqa: E402

VERSION = "v1.0-synth"


class Sampler(threading.Thread):
    """Peak RSS of this driver's Ray workers and peak object-store bytes, polled in the background."""

    def __init__(self, ray):
        super().__init__(daemon=True)
        import psutil
        self.me, self.ray, self.stop_ = psutil.Process(), ray, threading.Event()
        self.worker_peak, self.store_peak, self.workers = 0, 0, set()

    def run(self):
        from ray._private.internal_api import memory_summary
        last_store = 0.0
        while not self.stop_.is_set():
            for p in self.me.children(recursive=True):
                try:
                    if p.cmdline()[:1] and p.cmdline()[0].startswith("ray::"):
                        self.workers.add(p.pid)
                        self.worker_peak = max(self.worker_peak, p.memory_info().rss)
                except Exception:  # a worker that exited between listing and reading
                    pass
            if time.monotonic() - last_store > 1.0:
                last_store = time.monotonic()
                try:
                    m = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(stats_only=True))
                    self.store_peak = max(self.store_peak, int(m.group(1)) << 20 if m else 0)
                except Exception:
                    pass
            self.stop_.wait(0.2)


def frame_path_848(args, index: str, names: list[str]) -> dict:
    """The frame path's peak at 848x1600 for a 20 s scene of the table set (stage3's 848x1600 buckets).

    With frame windows (pipeline/shards/windows.py) it is the largest planned window under the
    build's default budget; without, it is today's frames_task object: every needed frame of the scene
    at that resolution in one FrameSet (P, H, W, 3) uint8. Allocated and filled by decode_frames for a
    window, computed (P x H x W x 3) for a whole scene larger than 2 GB (this machine is shared)."""
    import numpy as np
    from pipeline.shards.build_config import BuildConfig
    from pipeline.scenes.buckets import load_stage, make_clip_index
    from pipeline.shards.encode import plan_units, reuse_holds
    from pipeline.shards.plan import _Scene, scene_facts
    from pipeline.shards.write import ClipRef
    stage = load_stage("stage3")
    stage.buckets[:] = [b for b in stage.buckets if (b.height, b.width) == (848, 1600)]
    f = scene_facts(index, args.data, names[0])
    sc = _Scene(f, VERSION)
    sc.frame_paths = np.array([[f"{i}/{v}" for v in sc.views] for i in range(sc.num_frames)], object)
    clips = make_clip_index([sc], stage).to_pylist()
    refs = [ClipRef(c["key"], c["split"], c["scene_name"], c["start"], c["num_frames"], c["height"], c["width"])
            for c in clips]
    cfg = BuildConfig(stage="stage3", dataroot=args.data, version=VERSION, out="", vae="")
    units, _ = plan_units(refs, {c["key"]: c["frames"] for c in clips}, reuse=reuse_holds(8))
    fb = 848 * 1600 * 3
    try:
        from pipeline.shards.windows import plan_calls
        budget = int(getattr(cfg, "frame_budget_mb", 1000.0) * 1e6)
        calls = plan_calls(units, budget, cfg.units_per_call)
        peak = max(c.window_bytes() for c in calls)
        how = f"largest frame window of {len(calls)} encode calls under --frame-budget-mb {budget / 1e6:g}"
    except ImportError:
        paths = {p for us in units.values() for u in us for row in u.frames for p in row}
        peak = len(paths) * fb
        how = (f"no frame windows in this checkout (pipeline/shards/windows.py): today's frames_task object, "
               f"{len(paths)} distinct frames x 848x1600x3 B of one 20 s scene")
    measured = None
    if peak <= 2e9:  # really decode that many frames with pipeline/shards/frames.py and weigh the object
        from pipeline.shards.frames import decode_frames
        import cv2
        tmp = tempfile.mkdtemp(prefix="scale-frames-")
        ok, jpg = cv2.imencode(".jpg", np.full((900, 1600, 3), 128, np.uint8))
        rel = [f"f{i:05d}.jpg" for i in range(peak // fb)]
        for r in rel:
            Path(tmp, r).write_bytes(jpg.tobytes())
        measured = decode_frames(tmp, rel, 1600, 848).pixels.nbytes
        shutil.rmtree(tmp)
    return {"frame_object_peak_gb": (measured or peak) / 1e9, "frame_object_how": how,
            "frame_object_measured": measured is not None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="trainval-sized table set (written here when missing)")
    p.add_argument("--counts", type=int, nargs="+", default=[10, 100, 850])
    p.add_argument("--max-seconds", type=float, default=600.0, help="wall-clock cap of one count's run")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--work", help="output folder (default: a temp folder, removed)")
    p.add_argument("--drop-rate", type=float, default=0.01, help="when --data is written: images dropped per camera")
    p.add_argument("--bursts", action="store_true", help="when --data is written: drops in bursts of 2-3 images "
                                                         "(docs/build.md's yield figures: --drop-rate 0.02 --bursts)")
    a = p.parse_args(argv)
    import ray
    from pipeline.build import _run_scenes
    from pipeline.shards.build_config import BuildConfig
    from pipeline.scenes.tableindex import ensure_table_index, read_meta, scene_names
    if not os.path.isdir(os.path.join(a.data, VERSION)):
        from pipeline.synth.scale import write_tables_only
        write_tables_only(a.data, scenes=max(a.counts), seconds=20.0, progress=True, drop_rate=a.drop_rate,
                          bursts=a.bursts)
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-scale-"))
    t0 = time.perf_counter()
    index = ensure_table_index(a.data, VERSION, str(work / "index"))
    index_s = time.perf_counter() - t0
    index_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    meta = read_meta(index)
    names = sorted(scene_names(index))
    ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    sampler = Sampler(ray)
    sampler.start()

    def run(count: int, first: int, tag: str) -> float:
        out = work / tag
        (out / "_work").mkdir(parents=True, exist_ok=True)
        os.symlink(work / "index" / "_work" / "tables", out / "_work" / "tables")   # the same index, not rebuilt
        cfg = BuildConfig(stage="demo", dataroot=a.data, version=VERSION, out=str(out), vae="", progress=False)
        quarantine, secs = [], {}
        t = time.perf_counter()
        stores = _run_scenes(ray, cfg, names[first:first + count], quarantine, secs)
        dt = time.perf_counter() - t
        assert len(stores) == count, (count, len(stores), quarantine[:3])
        shutil.rmtree(out)
        setup.append(secs["tables"])     # index check + maps (streamed once per driver): not per scene
        return dt - secs["tables"]

    setup: list[float] = []
    run(2, 0, "warmup")   # its own --out, removed after: the counted runs build these scenes again
    counts, per_scene, cut = [], [], None
    for n in a.counts:
        n = min(n, len(names))
        if per_scene and per_scene[-1] * n > a.max_seconds:
            cut = n
            n = int(a.max_seconds / per_scene[-1])
            if counts and n <= counts[-1]:
                break
        dt = run(n, 0, f"n{n}")
        counts.append(n)
        per_scene.append(dt / n)
        print(f"{n} scenes: {dt:.1f} s, {dt / n:.3f} s/scene, worker peak {sampler.worker_peak / 1e9:.2f} GB",
              flush=True)
    sampler.stop_.set()
    sampler.join()
    ray.shutdown()
    frames = frame_path_848(a, index, names)
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    figures = {
        "scene_counts": counts, "sec_per_scene": per_scene,
        "sec_per_scene_ratio_largest_vs_first": per_scene[-1] / per_scene[0],
        "largest_count_cut_from": cut, "max_seconds": a.max_seconds,
        "worker_peak_rss_gb": sampler.worker_peak / 1e9, "workers_seen": len(sampler.workers),
        "driver_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "driver_peak_rss_after_index_gb": index_rss, "object_store_peak_gb": sampler.store_peak / 1e9,
        "table_index_seconds": index_s, "table_index_seconds_when_built": meta["seconds"],
        "setup_seconds_per_run": setup, "table_records": meta["counts"], "table_scenes": len(names),
        "cpus": a.cpus, **frames,
    }
    cut_s = f" (850 cut to {counts[-1]} by --max-seconds)" if cut else ""
    save("scale", figures,
         f"{len(names)}-scene table set: s/scene {', '.join(f'{n}: {s:.2f}' for n, s in zip(counts, per_scene))}"
         f"{cut_s}, ratio {figures['sec_per_scene_ratio_largest_vs_first']:.2f}; worker peak "
         f"{figures['worker_peak_rss_gb']:.2f} GB, driver {figures['driver_peak_rss_gb']:.2f} GB, object store "
         f"{figures['object_store_peak_gb']:.2f} GB; index {index_s:.0f} s; frames@848x1600 "
         f"{frames['frame_object_peak_gb']:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
