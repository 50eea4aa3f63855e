"""The one entry point: nuScenes-format data -> CogVAE latent webdataset shards, on Ray.

    python pipeline/build.py --config demo --dataroot DATA --version v1.0-synth --out OUT --vae VAE
    ray job submit --working-dir . -- python pipeline/build.py ...      # same script on a cluster

Stages: scenes (one Ray task per scene -> zarr stores) -> clip index -> captions -> shard plan
-> frames (one CPU task per encode call: the frames of that call only, at most --frame-budget-mb,
pipeline/shards/windows.py) -> encode (a pool of VAE actors, num_gpus=1 when the cluster has GPUs) -> write
(one task per shard).
Tasks + actors rather than Ray Data: shards are planned before any work and each shard task
depends on exactly the encode results it needs, so Ray overlaps decoding, encoding and
writing by itself while the output stays byte-identical whatever the worker count or
finish order. Resume: shards already in the manifest (same config hash, same bytes) are
skipped. Failures go to quarantine.parquet and the build carries on.
"""
from __future__ import annotations

import os
import sys

if not __package__:  # run by path (`python pipeline/build.py`, `ray job submit`): make `pipeline` importable
    _here = os.path.dirname(os.path.abspath(__file__))
    # Drop pipeline/ itself from the path FIRST: its packages (scenes/, tools/, ...) would shadow installed
    # modules of the same name (also in Ray workers, which inherit the script directory when it is on sys.path).
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

import json
import time
from collections import Counter


from tqdm import tqdm  # noqa: E402

from pipeline.contract import cli, schema, storage  # noqa: E402
from pipeline.shards.build_config import BuildConfig, BuildSummary, build_parser  # noqa: E402
from pipeline.shards.raysession import init_ray, ray_running, stop_ray  # noqa: E402
from pipeline.shards.actorpool import actor_pool, forget_actors  # noqa: E402
from pipeline.shards.encode import plan_units, reuse_holds  # noqa: E402
from pipeline.contract.manifest import QuarantineRecord, read_manifest, read_quarantine  # noqa: E402
from pipeline.contract.manifest import write_manifest, write_quarantine  # noqa: E402
from pipeline.shards.write import ClipRef, ShardInputs, dataset_card, plan_shards  # noqa: E402
from pipeline.shards.write import shard_is_complete  # noqa: E402
from pipeline.shards.rebuild import input_fingerprint, record_build  # noqa: E402
from pipeline.scenes.clipyield import YieldReport  # noqa: E402
from pipeline.shards.yieldcard import build_yield  # noqa: E402
from pipeline.shards.buildinputs import content, is_tiny_vae, nothing_to_do, scene_names  # noqa: E402,F401
from captions.config import CaptionFatal  # noqa: E402

EXIT_INCOMPLETE = 3  # finished, but planned shards are missing (docs/cluster.md): rerun to complete


# ---- Ray task bodies (top-level so workers import them by name) ---------------------------------

# What each stage asks Ray for (ray_cluster.yaml must offer it). On a CPU-only cluster the VAE actor
# asks for --encode-cpus CPUs and no GPU instead.
RESOURCES: dict[str, dict] = {
    "vae_actor": {"num_cpus": 1, "num_gpus": 1},
    "scene_task": {"num_cpus": 1},
    "frames_task": {"num_cpus": 1},
    "write_task": {"num_cpus": 1},
}

_NUSC: dict = {}


def scene_task(dataroot: str, version: str, scene_name: str, out: str, index: str | None = None, map_crop=None):
    """Build (or reuse) one scene store. With ``index`` (the driver's pipeline/scenes/tableindex.py index) the task
    reads only its scene's records, and ``map_crop`` (pipeline/scenes/mapcrop.py) is its part of the map; without,
    the full devkit tables and map load once per worker process."""
    from pipeline.scenes.nuscenes import load_nuscenes
    from pipeline.scenes.scenestore import build_scene_store
    try:
        if index:
            from pipeline.scenes.tableindex import SceneTables
            nusc = SceneTables(index, scene_name, dataroot)
        else:
            if (dataroot, version) not in _NUSC:
                _NUSC[(dataroot, version)] = load_nuscenes(dataroot, version)
            nusc = _NUSC[(dataroot, version)]
        uri = build_scene_store(dataroot, version, scene_name, out, nusc=nusc, nusc_map=map_crop)
        return scene_name, uri, None
    except Exception as e:  # one broken scene must not stop the others; a full or broken disk stops the build
        disk = None if storage.is_remote(out) else storage.local_io_error(
            e, getattr(e, "filename", None) or out, f"writing the scene store of {scene_name}")
        if disk is not None:
            raise disk from e
        return scene_name, None, f"{type(e).__name__}: {e}"


def frames_task(dataroot: str, paths: list[str], width: int, height: int, draft: bool):
    """One encode call's frame window (pipeline/shards/windows.py) -> (FrameSet, small info for the driver)."""
    from pipeline.shards.frames import decode_frames
    t0 = time.perf_counter()
    fs = decode_frames(dataroot, paths, width, height, draft=draft)
    fs.seconds = time.perf_counter() - t0
    return fs, {"bytes": int(fs.pixels.nbytes), "frames": len(fs.paths), "seconds": fs.seconds}


def shard_task(inp: ShardInputs, *unit_results: dict):
    from pipeline.shards.windows import merge_parts
    from pipeline.shards.write import make_shard
    t0 = time.perf_counter()
    parts: dict[str, list] = {}
    for r in unit_results:  # a unit split by views (pipeline/shards/windows.py) comes back in several results
        for uid, res in r.items():
            parts.setdefault(uid, []).append(res)
    merged = {uid: merge_parts(parts[uid]) for uid in sorted(set(inp.unit_of.values()))}
    record, quarantine = make_shard(inp, merged)
    return record, quarantine, time.perf_counter() - t0


# ---- driver -------------------------------------------------------------------------------------


def _bar(cfg: BuildConfig, total: int, desc: str):
    return tqdm(total=total, desc=desc, unit="", disable=not cfg.progress, dynamic_ncols=True, leave=True)


def _run_scenes(ray, cfg, names, quarantine, secs):
    from pipeline.scenes.mapcrop import MapCropper
    from pipeline.scenes.run import problem_records
    from pipeline.scenes.scenestore import open_scene_store
    from pipeline.scenes.tableindex import ensure_table_index
    t0 = time.perf_counter()
    index = ensure_table_index(cfg.dataroot, cfg.version, cfg.out)   # tables read once per job, not per worker
    cropper = MapCropper(index, cfg.dataroot, names)                  # maps too: each read once, cut per scene
    secs["tables"] = time.perf_counter() - t0
    task = ray.remote(**RESOURCES["scene_task"])(scene_task)
    todo, refs = list(reversed(names)), []
    inflight = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))   # crops ride with their tasks: bounded

    def submit():
        while todo and len(refs) < inflight:
            n = todo.pop()
            refs.append(task.remote(cfg.dataroot, cfg.version, n, cfg.out, index, cropper.crop(n)))
    uris = {}
    with _bar(cfg, len(names), "scenes") as bar:
        submit()
        while refs:
            done, refs[:] = ray.wait(refs, num_returns=1)
            submit()
            name, uri, err = ray.get(done[0])
            if err:
                quarantine.append(QuarantineRecord("scenes", name, "scene_failed", err))
            else:
                uris[name] = uri
                # timeline problems (e.g. a missing sweep file) -> quarantine rows; their clips are left out
                probs = open_scene_store(uri, heavy=False).problems
                quarantine.extend(problem_records({"scene": name, "problems": probs}))
            bar.update(1)
    secs["scenes"] = time.perf_counter() - t0
    return dict(sorted(uris.items()))


def run_build(cfg: BuildConfig) -> BuildSummary:
    """The build, holding the lock of --out (pipeline/contract/outlock.py): a second build there is refused."""
    from pipeline.contract.outlock import OutputLock
    with OutputLock(cfg.out, "build"):   # first: a second build on this --out is refused before any other check
        return nothing_to_do(cfg) or _run_build(cfg)


def _run_build(cfg: BuildConfig) -> BuildSummary:
    from pipeline.scenes.buckets import load_stage, make_clip_index, write_clip_index
    from pipeline.scenes.scenestore import open_scene_store
    from captions.stage import caption_clips

    stage = load_stage(cfg.stage)
    vae, ccfg, captions, cfg_hash = content(cfg)
    if ccfg.mode == "mllm":
        ccfg.require_endpoint()  # before any work
    summary, secs, quarantine = BuildSummary(), {}, []
    names = scene_names(cfg)  # a wrong --dataroot / --version / --scenes fails before Ray starts
    fingerprint = input_fingerprint(cfg.dataroot, cfg.version, names)
    t0 = time.perf_counter()
    ray = init_ray(cfg.cpus, cfg.address)
    secs["ray_start"] = time.perf_counter() - t0
    has_gpu = ray.cluster_resources().get("GPU", 0) > 0
    total_cpus = ray.cluster_resources().get("CPU", 0)
    if not has_gpu and cfg.encode_actors * cfg.encode_cpus > total_cpus - 1:
        raise cli.BadInput(f"{cfg.encode_actors} encode actors x {cfg.encode_cpus} CPUs leave no CPU of {total_cpus:g} "
                           "for decoding and writing; lower --encode-actors or --encode-cpus (fractions are fine)")

    # the VAE actors start now: their model load (imports + weights, the longest single step of a small
    # build, docs/build.md) overlaps the scenes stage, the clip index and the captions
    actor_pool(ray, cfg, RESOURCES["vae_actor"] if has_gpu else None)
    store_uris = _run_scenes(ray, cfg, names, quarantine, secs)
    summary.scenes = len(store_uris)

    t0 = time.perf_counter()
    scenes = [open_scene_store(u, heavy=False) for u in store_uris.values()]
    report = YieldReport()   # possible / kept / repaired / lost per bucket (pipeline/shards/yieldcard.py)
    clips = make_clip_index(scenes, stage, quarantine, report)
    write_clip_index(clips, cfg.out)
    summary.clips = dict(Counter(clips.column("bucket").to_pylist()))
    secs["clip_index"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cap = caption_clips(clips, cfg.dataroot, ccfg, cfg.out, {s.scene_name: s.description for s in scenes},
                        progress=cfg.progress)
    quarantine.extend(cap.quarantine)
    secs["captions"] = time.perf_counter() - t0
    if clips.num_rows and not cap.captions:  # every caption failed: no shard can be planned, say so (exit 3)
        first = cap.quarantine[0] if cap.quarantine else None
        summary.complete, summary.stop_reason = False, f"no clip of {clips.num_rows} was captioned" + (
            f"; first failure: {first.reason} ({first.detail[:200]})" if first else "")
        write_quarantine(cfg.out, _dedupe(quarantine))
        summary.quarantined = len(_dedupe(quarantine))
        summary.seconds = secs
        return summary

    rows = clips.to_pylist()
    frames_of = {r["key"]: r["frames"] for r in rows}
    refs = [ClipRef(r["key"], r["split"], r["scene_name"], r["start"], r["num_frames"], r["height"], r["width"])
            for r in rows if r["key"] in cap.captions]
    plans = plan_shards(refs, cfg.samples_per_shard)
    summary.shards_total = len(plans)
    splits = sorted({p.split for p in plans})
    records = {r.path: r for s in splits for r in read_manifest(cfg.out, s)}
    done = {p.path for p in plans if shard_is_complete(cfg.out, p, records.get(p.path), cfg_hash, cfg.verify_resume)}
    records = {k: v for k, v in records.items() if k in done}   # stale rows (other config) are dropped
    todo = [p for p in plans if p.path not in done]
    summary.shards_skipped = len(done)
    kept_keys = {k for p in plans if p.path in done for k in p.keys}
    quarantine.extend(q for q in read_quarantine(cfg.out)
                      if q.stage in ("frames", "encode", "write") and q.item in kept_keys)

    written = _encode_and_write(ray, cfg, todo, frames_of, store_uris, cap.captions, vae, cfg_hash, has_gpu,
                                records, splits, quarantine, secs, summary)
    summary.shards_written = written
    summary.seconds = secs
    if cfg.timeline:  # where the time went, per task (pipeline/tools/timeline.py sums it per stage)
        ray.timeline(filename=cfg.timeline)
    write_quarantine(cfg.out, _dedupe(quarantine))
    summary.quarantined = len(_dedupe(quarantine))
    for r in records.values():
        summary.samples[r.bucket] = summary.samples.get(r.bucket, 0) + r.samples
        summary.bytes[r.bucket] = summary.bytes.get(r.bucket, 0) + r.bytes
    summary.yield_report = build_yield(report, {r["key"]: r["bucket"] for r in rows}, set(cap.captions),
                                       records.values(), _dedupe(quarantine))
    summary.judge([p.path for p in plans], records, quarantine)  # by the manifests, whatever stopped it
    dataset_card(cfg.out, sorted(records.values(), key=lambda r: r.path), summary.quarantined, {
        "dataset": scenes[0].dataset if scenes else cfg.version, "version": cfg.version,
        "dataroot": cfg.dataroot, "scenes": len(store_uris), "stage": json.dumps(cfg._stage_dict()),
        "vae": vae, "tiny_vae": is_tiny_vae(cfg.vae),
        "captions": captions, "config_hash": cfg_hash, "status": summary.status(), "yield": summary.yield_report})
    if summary.complete:
        record_build(cfg.out, cfg_hash, fingerprint, [p.path for p in plans], summary)
    return summary


def _dedupe(records: list[QuarantineRecord]) -> list[QuarantineRecord]:
    seen = {(q.stage, q.item, q.reason, q.detail): q for q in records}
    return [seen[k] for k in sorted(seen)]


def _encode_and_write(ray, cfg, todo, frames_of, store_uris, captions, vae, cfg_hash, has_gpu, records, splits,
                      quarantine, secs, summary) -> int:
    from pipeline.shards.windows import plan_calls, window_stats
    t0 = time.perf_counter()
    units, unit_of = plan_units([c for p in todo for c in p.clips], frames_of,
                                reuse=reuse_holds(cfg.encode.frame_batch))
    if not todo:
        secs["encode+write"] = 0.0
        return 0
    # one frame window per encode call, each at most frame_budget_mb (pipeline/shards/windows.py)
    plan = plan_calls(units, int(cfg.frame_budget_mb * 1e6), cfg.units_per_call)
    summary.windows = window_stats(plan)
    actors = actor_pool(ray, cfg, RESOURCES["vae_actor"] if has_gpu else None)
    inject = set(cfg.encode.inject_nan_keys)
    for us in units.values():
        for u in us:
            u.inject_nan = bool(inject & set(u.keys))
    ftask = ray.remote(**RESOURCES["frames_task"])(frames_task).options(num_returns=2)
    stask = ray.remote(**RESOURCES["write_task"])(shard_task)
    parts_left = Counter(u.uid for c in plan for u in c.units)  # calls still to submit per unit
    uid_refs: dict[str, list] = {}
    pending_calls, info_refs = [], []
    shard_refs, written = {}, 0
    need = {p.path: {unit_of[k] for k in p.keys} for p in todo}
    missing = {p.path: len(need[p.path]) for p in todo}         # units not fully submitted per shard
    shards_of: dict[str, list] = {}
    for p in todo:
        for u in need[p.path]:
            shards_of.setdefault(u, []).append(p)
    users = Counter(u for uids in need.values() for u in uids)  # shards still to launch per unit
    bar_e, bar_w = _bar(cfg, len(plan), "encode calls"), _bar(cfg, len(todo), "shards")
    stop = False
    dirty, last_manifest = set(), [0.0]

    def launch(p) -> None:
        refs = sorted({r for u in need[p.path] for r in uid_refs[u]}, key=lambda r: r.hex())
        inp = ShardInputs(p, cfg.out, {c.scene_name: store_uris[c.scene_name] for c in p.clips},
                          {k: captions[k] for k in p.keys}, {k: unit_of[k] for k in p.keys}, vae,
                          cfg.encode.store_std, cfg_hash)
        shard_refs[stask.remote(inp, *refs)] = p
        for u in need[p.path]:  # the task holds its refs now: forget units no other shard needs,
            users[u] -= 1       # so latents leave the object store as soon as their shards are written
            if users[u] == 0:
                del uid_refs[u]

    def collect(block: bool) -> None:
        nonlocal written, stop, pending_calls
        if pending_calls:
            ready, pending_calls = ray.wait(pending_calls, num_returns=len(pending_calls), timeout=0)
            bar_e.update(len(ready))
        if not shard_refs:
            return
        ready, _ = ray.wait(list(shard_refs), num_returns=1 if block else len(shard_refs), timeout=None if block else 0)
        for r in ready:
            p = shard_refs.pop(r)
            if stop:
                continue
            try:
                record, q, _ = ray.get(r)
            except Exception as e:  # e.g. storage down after retries: not in the manifest, a rerun retries it
                cause = getattr(e, "cause", None) or e
                if isinstance(cause, storage.LocalIOError):  # a full or broken disk: every shard would fail
                    stop = True
                    summary.stop_reason = str(cause)
                    bar_w.update(1)
                    continue
                quarantine.append(QuarantineRecord("write", p.path, "shard_failed", f"{type(e).__name__}: {e}"[:2000]))
                bar_w.update(1)
                continue
            records[record.path] = record
            quarantine.extend(q)
            # the manifest is rewritten as shards complete (at most every manifest_every_s): a crash loses at
            # most the shards of the last interval, which a rerun writes again (same bytes)
            dirty.add(p.split)
            if time.perf_counter() - last_manifest[0] >= cfg.manifest_every_s:
                for s in sorted(dirty):
                    write_manifest(cfg.out, s, [x for x in records.values() if x.split == s])
                dirty.clear()
                last_manifest[0] = time.perf_counter()
            written += 1
            bar_w.update(1)
            if cfg.max_shards is not None and written >= cfg.max_shards:
                stop = True

    for i, call in enumerate(plan):
        if stop:
            break
        while len(pending_calls) >= cfg.max_inflight:  # bounds the windows alive: max_inflight x the budget
            ray.wait(pending_calls, num_returns=1)
            collect(block=False)
        _scene, h, w = call.group
        fref, iref = ftask.remote(cfg.dataroot, call.paths, w, h, cfg.draft)
        info_refs.append(iref)
        ref = actors[i % len(actors)].run.remote(fref, call.units, call.views)
        pending_calls.append(ref)
        del fref  # the actor call holds the window; it leaves the store when the call is done
        for u in call.units:
            uid_refs.setdefault(u.uid, []).append(ref)
            parts_left[u.uid] -= 1
            if parts_left[u.uid] == 0:  # every part submitted: shards whose units are all in flight can go
                for p in shards_of.get(u.uid, []):
                    missing[p.path] -= 1
                    if missing[p.path] == 0:
                        launch(p)
        collect(block=False)
    while shard_refs and not stop:
        collect(block=True)
    if stop:
        summary.complete = False
        summary.stop_reason = summary.stop_reason or f"--max-shards {cfg.max_shards} reached"
        for r in list(shard_refs) + pending_calls:  # files may land, but no manifest row names them
            try:
                ray.cancel(r)
            except Exception:  # already finished, or an actor task Ray cannot cancel any more
                pass
    bar_e.close(), bar_w.close()
    for s in splits:
        write_manifest(cfg.out, s, [x for x in records.values() if x.split == s])
    infos = []
    for r in info_refs if not stop else []:
        try:
            infos.append(ray.get(r))
        except Exception:  # a frames task that failed for good: its shards are quarantined as shard_failed
            pass
    summary.windows["peak_object_bytes"] = max((x["bytes"] for x in infos), default=0)  # measured, not planned
    secs["decode_busy"] = sum(x["seconds"] for x in infos)
    secs["encode+write"] = time.perf_counter() - t0
    return written


def parse_args(argv: list[str] | None = None) -> BuildConfig:
    return build_parser(__doc__).parse(argv)


@cli.entry
def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    t0 = time.perf_counter()
    ray_before = ray_running()
    try:
        summary = run_build(cfg)
    except (storage.LocalIOError, CaptionFatal) as e:  # a full disk, a caption server that fails every request
        cause = getattr(e, "cause", None) or e
        if cli.debug_requested(argv):
            raise
        print(f"error: {cli.one_line(cause)}; the build stopped: rerun the same command to resume", file=sys.stderr)
        return EXIT_INCOMPLETE
    finally:
        t1 = time.perf_counter()
        if not ray_before and ray_running():
            stop_ray()
            forget_actors()  # their handles died with that Ray
    summary.seconds["ray_stop"] = round(time.perf_counter() - t1, 1)
    summary.seconds["total"] = time.perf_counter() - t0
    print(summary.text())
    print(f"shards: {os.path.abspath(cfg.out) if not storage.is_remote(cfg.out) else cfg.out}/<split>/<bucket>/; "
          f"manifests: <split>/{os.path.basename(schema.manifest_path('x'))}; quarantine: {schema.QUARANTINE_FILE}")
    if not summary.complete:
        print(f"error: {summary.status()}", file=sys.stderr)
    return 0 if summary.complete else EXIT_INCOMPLETE


if __name__ == "__main__":
    # run the copy imported as pipeline.build, so Ray workers import the task functions by module name
    from pipeline.build import main as _main
    sys.exit(_main())
