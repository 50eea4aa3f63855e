"""Scene processing on its own: nuScenes tables -> per-scene zarr stores -> clip index.

    python -m pipeline.scenes.run --dataroot DIR --version v1.0-trainval --out OUT [--stage demo] [--workers N]

For every scene (or the ``--scene`` ones): the 12 Hz timeline, 2 Hz -> 12 Hz boxes and
8-class BEV maps go to ``OUT/_work/scenes/<scene>.zarr`` (skipped when up to date);
then the stage's buckets cut the scenes into clips, written to
``OUT/_work/clips.parquet``. Unusable frames/clips and failed scenes are recorded in
``OUT/quarantine.parquet`` (stage "scenes") and the run carries on.

``process_scene`` is a plain top-level function of plain arguments so that the Ray
build can run it as a task per scene.
"""
from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

from tqdm import tqdm

from pipeline.contract import cli, manifest
from pipeline.scenes.bevmap import BevConfig
from pipeline.scenes.buckets import clip_counts, load_stage, make_clip_index, write_clip_index
from pipeline.scenes.clipyield import YieldReport
from pipeline.contract.manifest import QuarantineRecord
from pipeline.scenes.mapcrop import MapCropper
from pipeline.scenes.nuscenes import DEFAULT_TOLERANCE_S, check_tables, load_nuscenes
from pipeline.scenes.scenestore import build_scene_store_status, open_scene_store
from pipeline.scenes.tableindex import SceneTables, ensure_table_index, scene_names

STAGE = "scenes"


@dataclass
class ScenesConfig:
    dataroot: str
    version: str
    out: str
    stage: str | None = "demo"          # stage name or YAML path; None = stores only, no clip index
    scenes: list[str] | None = None     # None = every scene of the version
    workers: int = 1
    force: bool = False
    tolerance_s: float = DEFAULT_TOLERANCE_S
    bev_resolution_m: float = BevConfig.resolution_m
    progress: bool = True


@dataclass
class ScenesResult:
    stores: list[str]                   # URIs of the scene stores, by scene name
    summaries: list[dict]               # per scene: scene, uri, frames, objects, problems, computed, seconds
    clip_index: str | None
    clip_counts: dict[str, int]
    quarantine: list[QuarantineRecord] = field(default_factory=list)
    seconds: float = 0.0
    yield_report: YieldReport | None = None   # per bucket possible / kept / repaired / lost (with a stage)

    @property
    def frames(self) -> int:
        return sum(s["frames"] for s in self.summaries)

    @property
    def objects(self) -> int:
        return sum(s["objects"] for s in self.summaries)


def process_scene(dataroot: str, version: str, scene_name: str, out: str, force: bool = False,
                  tolerance_s: float = DEFAULT_TOLERANCE_S,
                  bev_resolution_m: float = BevConfig.resolution_m, index: str | None = None,
                  map_crop=None) -> dict:
    """Build (or reuse) one scene store; returns a summary dict. Raises on a broken scene.
    ``index``: a pipeline/scenes/tableindex.py index (only this scene's records are read), ``map_crop`` its part of the
    map (pipeline/scenes/mapcrop.py); None = the devkit's tables / NuScenesMap."""
    t0 = time.perf_counter()
    nusc = SceneTables(index, scene_name, dataroot) if index else None
    uri, computed = build_scene_store_status(dataroot, version, scene_name, out, nusc=nusc, nusc_map=map_crop,
                                             force=force,
                                             tolerance_s=tolerance_s, bev=BevConfig(resolution_m=bev_resolution_m))
    sc = open_scene_store(uri, heavy=False)
    return {"scene": scene_name, "uri": uri, "frames": sc.num_frames, "objects": int(sc.box_class.shape[0]),
            "problems": sc.problems, "computed": computed, "seconds": time.perf_counter() - t0}


def list_scenes(dataroot: str, version: str, index: str | None = None) -> list[str]:
    return sorted(scene_names(index) if index else (s["name"] for s in load_nuscenes(dataroot, version).scene))


def problem_records(summary: dict) -> list[QuarantineRecord]:
    """Quarantine rows for a scene's timeline problems ({"scene": name, "problems": [...]}) that were not repaired
    (a dropped image filled from the same camera's nearest round loses nothing: the yield report counts it)."""
    return [QuarantineRecord(STAGE, f"{summary['scene']}/frame{p['frame']:04d}/{p['view']}", p["reason"], p["detail"])
            for p in summary["problems"] if p.get("filled_from", -1) < 0]




def process_scenes(cfg: ScenesConfig) -> ScenesResult:
    t0 = time.perf_counter()
    stage = load_stage(cfg.stage) if cfg.stage else None   # fail on a bad stage before hours of work
    check_tables(cfg.dataroot, cfg.version)                 # and on a wrong --dataroot / --version
    index = ensure_table_index(cfg.dataroot, cfg.version, cfg.out)   # the tables, read once for all workers
    names = sorted(cfg.scenes) if cfg.scenes else list_scenes(cfg.dataroot, cfg.version, index)
    cropper = MapCropper(index, cfg.dataroot, names)                  # and each map
    args = dict(dataroot=cfg.dataroot, version=cfg.version, out=cfg.out, force=cfg.force,
                tolerance_s=cfg.tolerance_s, bev_resolution_m=cfg.bev_resolution_m, index=index)
    summaries: dict[str, dict] = {}
    quarantine: list[QuarantineRecord] = []
    bar = tqdm(total=len(names), desc="scenes", unit="scene", disable=not cfg.progress, file=sys.stderr)

    def done(name, fn):
        try:
            summaries[name] = fn()
            quarantine.extend(problem_records(summaries[name]))
        except Exception as e:  # one broken scene must not stop the others
            quarantine.append(QuarantineRecord(STAGE, name, "scene_failed", f"{type(e).__name__}: {e}"))
        bar.update(1)

    if cfg.workers <= 1:
        for name in names:
            done(name, lambda n=name: process_scene(scene_name=n, map_crop=cropper.crop(n), **args))
    else:
        with ProcessPoolExecutor(max_workers=cfg.workers) as pool:
            futures = {pool.submit(process_scene, scene_name=n, map_crop=cropper.crop(n), **args): n for n in names}
            for fut in as_completed(futures):
                done(futures[fut], fut.result)
    bar.close()
    ordered = [summaries[n] for n in names if n in summaries]
    index_uri, counts, report = None, {}, None
    if stage is not None:
        scenes = [open_scene_store(s["uri"], heavy=False) for s in ordered]
        report = YieldReport()
        table = make_clip_index(scenes, stage, quarantine, report)
        index_uri, counts = write_clip_index(table, cfg.out), clip_counts(table)
    quarantine.sort(key=lambda r: (r.stage, r.item, r.reason))
    return ScenesResult(stores=[s["uri"] for s in ordered], summaries=ordered, clip_index=index_uri,
                        clip_counts=counts, quarantine=quarantine, seconds=time.perf_counter() - t0,
                        yield_report=report)


def write_quarantine(out: str, records: list[QuarantineRecord]) -> str:
    """Replace this stage's rows of OUT/quarantine.parquet, keeping the other stages' rows."""
    keep = [r for r in manifest.read_quarantine(out) if r.stage != STAGE]
    return manifest.write_quarantine(out, keep + records)


def summary_text(res: ScenesResult) -> str:
    lines = [f"scenes: {len(res.summaries)} ({sum(s['computed'] for s in res.summaries)} computed, "
             f"{sum(not s['computed'] for s in res.summaries)} up to date)",
             f"frames: {res.frames}   objects: {res.objects}   time: {res.seconds:.1f} s"]
    if res.clip_index:
        lines.append(f"clips: {sum(res.clip_counts.values())} -> {res.clip_index}")
        lines += [f"  {b}: {n}" for b, n in res.clip_counts.items()]
    if res.yield_report is not None:
        lines += res.yield_report.lines()
    if res.quarantine:
        reasons: dict[str, int] = {}
        for r in res.quarantine:
            reasons[r.reason] = reasons.get(r.reason, 0) + 1
        lines.append(f"quarantined: {len(res.quarantine)} " + ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())))
        lines += [f"  {r.item}: {r.reason}: {r.detail}" for r in res.quarantine[:10]]
    return "\n".join(lines)


@cli.entry
def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(
        prog="mdv2-scenes", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataroot", required=True, help="nuScenes root: holds VERSION/, samples/, sweeps/, maps/")
    p.add_argument("--version", required=True, help="table folder, e.g. v1.0-trainval, v1.0-mini, v1.0-synth")
    p.add_argument("--out", required=True, help="output root (local folder or s3://...), shared with the build")
    p.add_argument("--stage", default="demo",
                   help="stage name (pipeline/configs/stages/NAME.yaml) or YAML path for the clip index; 'none' = skip it")
    p.add_argument("--scene", action="append", dest="scenes", help="only this scene (repeatable)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes; each reads only its scenes' records from the table index")
    p.add_argument("--force", action="store_true", help="recompute stores even when up to date")
    p.add_argument("--tolerance-ms", type=float, default=DEFAULT_TOLERANCE_S * 1000,
                   help="max distance of a view's frame from its expected time in the trigger round "
                        "(CAM_FRONT + the view's rig offset)")
    p.add_argument("--bev-resolution", type=float, default=BevConfig.resolution_m,
                   help="metres per pixel of the once-per-scene map raster (BEV cells are 0.5 m)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    cfg = ScenesConfig(dataroot=a.dataroot, version=a.version, out=a.out,
                       stage=None if a.stage.lower() == "none" else a.stage, scenes=a.scenes, workers=a.workers,
                       force=a.force, tolerance_s=a.tolerance_ms / 1000, bev_resolution_m=a.bev_resolution,
                       progress=not a.no_progress)
    res = process_scenes(cfg)
    write_quarantine(cfg.out, res.quarantine)
    print(summary_text(res))
    return 0 if res.summaries or not (cfg.scenes or res.quarantine) else 1


if __name__ == "__main__":
    sys.exit(main())
