"""pipeline/build.py end to end on real local Ray, the synthetic dataset and the tiny CogVAE.

One reference build is shared by the module; the other builds (more workers, interrupted +
resumed, damaged data) are compared with it byte for byte or count for count."""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.contract import schema
from pipeline.build import parse_args, run_build
from pipeline.scenes.buckets import read_clip_index
from pipeline.contract.manifest import read_manifest, read_quarantine
from pipeline.scenes.scenestore import open_scene_store, store_uri
from pipeline.contract.shardio import iter_shard

pytestmark = pytest.mark.slow
STAGE = str(Path(__file__).parent / "data" / "build_test_stage.yaml")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from pipeline.shards.vae import write_tiny_vae
    return write_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-cogvae")


def _build(ray_local, data, vae, out, *extra, stores_from=None):
    if stores_from:  # reuse scene stores (their inputs hash matches): the tests compare the later stages
        shutil.copytree(Path(stores_from) / schema.WORK_DIR / "scenes", Path(out) / schema.WORK_DIR / "scenes")
    cfg = parse_args(["--config", STAGE, "--dataroot", str(data.root), "--version", data.version, "--out", str(out),
                      "--vae", str(vae), "--samples-per-shard", "4", "--no-progress", "--encode-cpus", "0.5",
                      "--captions", "dataset", *extra])
    return run_build(cfg)


def _digests(out) -> dict[str, str]:
    files = sorted(glob.glob(f"{out}/*/*/shard-*.tar") + glob.glob(f"{out}/*/manifest.parquet")
                   + [f"{out}/{schema.QUARANTINE_FILE}"])
    return {os.path.relpath(f, out): hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files}


def _samples(out):
    for path in sorted(glob.glob(f"{out}/*/*/shard-*.tar")):
        for key, members in iter_shard(path):
            yield path, schema.decode_sample(members, key)


@pytest.fixture(scope="module")
def ref(ray_local, synth_dataset, vae_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("build-ref")
    summary = _build(ray_local, synth_dataset, vae_dir, out)
    return out, summary


def test_reference_build_is_complete_and_matches_the_scene_stores(ref, synth_dataset):
    out, summary = ref
    index = read_clip_index(str(out)).to_pylist()
    assert summary.complete and summary.quarantined == 0 and read_quarantine(str(out)) == []
    keys = sorted(k for _, s in _samples(out) for k in [s.key])
    assert keys == sorted(r["key"] for r in index) and len(keys) == sum(summary.samples.values())
    assert {"32x64_t1", "32x64_t9", "32x64_t17"} == set(summary.samples)
    stores = {}
    for path, s in _samples(out):
        m, t, start = s.meta, s.num_frames, s.meta["start_frame"]
        assert f"/{m['split']}/{schema.bucket_name(32, 64, t)}/" in path
        assert s.latent_mean.shape == (6, 16, (t - 1) // 4 + 1, 4, 8) and s.latent_std is not None
        sa = stores.setdefault(m["scene_name"], open_scene_store(store_uri(str(out), m["scene_name"])))
        rng = slice(start, start + t)
        assert m["frames"] == sa.frame_paths[rng].tolist() and m["timestamps_us"] == sa.timestamps_us[rng].tolist()
        assert m["view_timestamps_us"] == sa.view_timestamps_us[rng].tolist()
        # objects: every instance present in some view of the clip, boxes/masks equal to the store's columns
        present = np.flatnonzero(sa.box_mask[rng].any(0) | sa.view_box_mask[rng].any((0, 1)))
        assert s.box_track.tolist() == present.tolist()
        assert np.array_equal(s.box_mask, sa.box_mask[rng][:, present])
        assert np.allclose(s.boxes[s.box_mask], sa.boxes[rng][:, present][s.box_mask])
        assert not s.boxes[~s.box_mask].any() and np.array_equal(s.box_class, sa.box_class[present])
        vmask = sa.view_box_mask[rng][:, :, present]                                   # (T, V, N)
        assert np.array_equal(s.view_boxes[vmask], sa.view_boxes[rng][:, :, present][vmask])
        assert not s.view_boxes[~vmask].any()
        ref_view = s.meta["views"].index(schema.REFERENCE_VIEW)        # CAM_FRONT's own boxes are the reference
        assert np.allclose(s.view_boxes[:, ref_view][s.box_mask], s.boxes[s.box_mask], atol=1e-5)
        # trajectory: LiDAR(t) -> LiDAR(0)
        l2g = sa.lidar2global[rng].astype(np.float64)
        assert np.allclose(s.traj, np.linalg.inv(l2g[0]) @ l2g, atol=1e-4)
        assert np.allclose(s.traj[0], np.eye(4), atol=1e-6)
        # intrinsics after resize to width 64 and top crop to 32 rows (400x225 -> 64x36 -> 64x32)
        w0, h0 = sa.image_size
        k = sa.intrinsics.astype(np.float64) * np.array([[64 / w0], [64 / w0], [1]])
        k[:, 1, 2] -= round(h0 * 64 / w0) - 32
        assert np.allclose(s.intrinsics, k, atol=1e-4)
        assert np.array_equal(s.bev, sa.bev[schema.bev_grid(s.meta["height"])[0]][rng])
        assert np.array_equal(s.cam2lidar, sa.cam2lidar[rng]) and not s.fill_mask.any()
        # view masks: some corner of the view's own box in front of the camera and inside the 64x32 image
        from pipeline.contract.geometry import box_corners
        c = box_corners(s.view_boxes.astype(np.float64))                             # (T, V, N, 8, 3)
        l2c = np.linalg.inv(s.cam2lidar.astype(np.float64))                         # (T, V, 4, 4)
        cam = np.einsum("tvij,tvnkj->tvnki", l2c[..., :3, :3], c) + l2c[:, :, None, None, :3, 3]
        uvw = np.einsum("vij,tvnkj->tvnki", s.intrinsics.astype(np.float64), cam)
        z = cam[..., 2]
        u, v = uvw[..., 0] / np.where(z == 0, 1e-9, z), uvw[..., 1] / np.where(z == 0, 1e-9, z)
        vis = ((z > 0.1) & (u >= 0) & (u < 64) & (v >= 0) & (v < 32)).any(-1) & vmask
        assert np.array_equal(s.box_view_mask, vis)
        assert s.caption and m["caption"]["source"] == "dataset" and m["latent"] == "mean+std"


def test_shorter_clips_are_cut_exactly_from_longer_ones(ref, synth_dataset, vae_dir):
    from pipeline.shards.encode import EncodeConfig, VaeEncoder
    from pipeline.shards.frames import decode_frames
    out, _ = ref
    by = {(s.meta["scene_name"], s.meta["start_frame"], s.num_frames): s for _, s in _samples(out)}
    pairs = [(k, by[(k[0], k[1], 17)]) for k in by if k[2] == 9 and (k[0], k[1], 17) in by]
    assert pairs
    for k, long in pairs:
        assert np.array_equal(by[k].latent_mean, long.latent_mean[:, :, :3])
    # and a cut 9-frame clip equals encoding those 9 frames on their own
    s9 = by[pairs[0][0]]
    paths = [p for row in s9.meta["frames"] for p in row]
    fs = decode_frames(str(synth_dataset.root), paths, 64, 32)
    idx = fs.index()
    clip = fs.pixels[np.array([[idx[p] for p in row] for row in s9.meta["frames"]]).T]  # (V, T, H, W, 3)
    mean, std = VaeEncoder(EncodeConfig(vae=vae_dir, device="cpu")).encode(clip)
    assert np.array_equal(mean, s9.latent_mean) and np.array_equal(std, s9.latent_std)


def test_more_workers_give_byte_identical_output(ref, ray_local, synth_dataset, vae_dir, tmp_path):
    out, _ = ref
    _build(ray_local, synth_dataset, vae_dir, tmp_path, "--encode-actors", "2",
           "--units-per-call", "1", "--max-inflight", "2", stores_from=out)
    assert _digests(tmp_path) == _digests(out)


def test_frame_windows_stay_within_a_tiny_budget_and_the_output_is_byte_identical(ref, ray_local, synth_dataset,
                                                                                   vae_dir, tmp_path):
    out, ref_summary = ref
    frame = 32 * 64 * 3
    budget = 2 * 17 * frame + 1  # two views of a 17-frame clip: every video unit is split by views
    # the default budget holds a whole call's frames (several units, all views): more than the tiny one
    assert ref_summary.windows["peak_object_bytes"] > budget
    assert 0 < ref_summary.windows["peak_object_bytes"] <= 1e9
    summary = _build(ray_local, synth_dataset, vae_dir, tmp_path, "--frame-budget-mb", str(budget / 1e6),
                     stores_from=out)
    # measured in the frames tasks on the arrays they decoded (the objects the encode calls receive)
    assert 0 < summary.windows["peak_object_bytes"] <= budget
    assert summary.windows["peak_window_bytes"] == summary.windows["peak_object_bytes"]
    assert summary.windows["calls"] > ref_summary.windows["calls"]
    assert _digests(tmp_path) == _digests(out)


def test_interrupted_build_resumes_only_the_missing_shards(ref, ray_local, synth_dataset, vae_dir, tmp_path):
    out, ref_summary = ref
    first = _build(ray_local, synth_dataset, vae_dir, tmp_path, "--max-shards", "3", stores_from=out)
    assert not first.complete and first.shards_written == 3
    listed = [r for s in ("train", "val") for r in read_manifest(str(tmp_path), s)]
    assert len(listed) == 3
    inodes = {r.path: os.stat(tmp_path / r.path).st_ino for r in listed}
    second = _build(ray_local, synth_dataset, vae_dir, tmp_path)
    assert second.complete and second.shards_skipped == 3
    assert second.shards_written == ref_summary.shards_total - 3
    assert {p: os.stat(tmp_path / p).st_ino for p in inodes} == inodes  # the 3 complete shards were not rewritten
    assert _digests(tmp_path) == _digests(out)


def test_damaged_inputs_are_quarantined_and_everything_else_is_written(ref, ray_local, synth_dataset, vae_dir,
                                                                       tmp_path):
    out, _ = ref
    scene = synth_dataset.scene_names[0]
    index = [r for r in read_clip_index(str(out)).to_pylist() if r["scene_name"] == scene]
    uses = lambda path: {r["key"] for r in index if any(path in row for row in r["frames"])}  # noqa: E731
    missing = next(p for r in index if r["start"] == 0 and r["num_frames"] == 17 for p in r["frames"][5]
                   if p.startswith("sweeps/"))
    corrupt = next(p for r in index if r["start"] == 48 and r["num_frames"] == 17 for p in r["frames"][12])
    nan_key = next(r["key"] for r in index if r["num_frames"] == 1
                   and not (r["key"] in uses(missing) | uses(corrupt)))
    assert uses(missing) and uses(corrupt) and not uses(missing) & uses(corrupt)
    data = tmp_path / "data"
    shutil.copytree(synth_dataset.root, data)
    os.remove(data / missing)
    blob = (data / corrupt).read_bytes()
    (data / corrupt).write_bytes(blob[: len(blob) // 3])
    damaged = type(synth_dataset)(**{**synth_dataset.__dict__, "root": data})
    summary = _build(ray_local, damaged, vae_dir, tmp_path / "out", "--scenes", scene, "--inject-nan", nan_key)
    q = read_quarantine(str(tmp_path / "out"))
    by_stage = {st: sorted(r.item for r in q if r.stage == st) for st in ("scenes", "frames", "encode")}
    assert by_stage["frames"] == sorted(uses(corrupt)) and all(corrupt in r.detail for r in q if r.stage == "frames")
    assert by_stage["encode"] == [nan_key] and all(r.reason == "non_finite_latents" for r in q if r.stage == "encode")
    # the missing sweep file is repaired with the nearest image of the same camera: nothing of it is quarantined,
    # its clips are written with that view-frame filled (schema 3.0)
    assert by_stage["scenes"] == [] and len(q) == len(uses(corrupt)) + 1
    samples = {s.key: s for _, s in _samples(tmp_path / "out")}
    expected = sorted({r["key"] for r in index} - uses(corrupt) - {nan_key})
    assert sorted(samples) == expected and summary.complete and summary.quarantined == len(q)
    for key in uses(missing):
        s = samples[key]
        assert s.fill_mask.sum() == 1 and not any(missing in row for row in s.meta["frames"])
        (t, v), = s.meta["filled"]
        assert s.meta["frames"][t][v] != missing and s.meta["frames"][t][v].split("__")[1] == missing.split("__")[1]
    assert not any(samples[k].fill_mask.any() for k in expected if k not in uses(missing))
    y = summary.yield_report["buckets"]
    assert sum(b["repaired"] for b in y.values()) == len(uses(missing))
    assert sum(b["written"] for b in y.values()) == len(expected)
    assert sum(sum(b["lost_after_index"].values()) for b in y.values()) == len(uses(corrupt)) + 1
    assert "bad_frame" in summary.text() and "non_finite_latents" in summary.text()


def test_dataset_card_lists_what_the_manifests_hold(ref):
    out, summary = ref
    card = (Path(out) / schema.DATASET_CARD_FILE).read_text()
    assert f"sample schema {schema.SCHEMA_VERSION}" in card and "TINY RANDOM WEIGHTS" in card
    for split in ("train", "val"):
        per_bucket: dict[str, list[int]] = {}
        for r in read_manifest(str(out), split):
            n = per_bucket.setdefault(r.bucket, [0, 0])
            n[0], n[1] = n[0] + 1, n[1] + r.samples
        assert per_bucket, split
        for bucket, (shards, samples) in per_bucket.items():
            assert f"| {split} | {bucket} | {shards} | {samples} |" in card, (split, bucket)
    assert f"Quarantined items (see `{schema.QUARANTINE_FILE}`): 0." in card
    assert "mdv2-stats" in card and "train.train" in card
    # the yield of the real run: nothing dropped in the test data, every possible clip written
    assert "## Yield (clips per bucket)" in card
    for name, b in summary.yield_report["buckets"].items():
        assert b["possible"] == b["kept"] == b["written"] and b["repaired"] == 0, (name, b)
        assert f"| {name} | {b['possible']} | {b['kept']} | 0 | 0 | {b['written']} | 100.0% | - |" in card
    assert "yield" in summary.text() and "warning" not in summary.text()


def test_capacity_plan_matches_the_reference_build(ref, synth_dataset, tmp_path, capsys):
    """mdv2-plan, which decodes and encodes nothing, predicts the build's clips, samples and shards per bucket
    exactly and its bytes within 10 %; schema 2.0's members add bytes."""
    from pipeline.shards.plan import main as plan_main
    out, summary = ref
    path = tmp_path / "plan.json"
    assert plan_main(["--config", STAGE, "--dataroot", str(synth_dataset.root), "--version", synth_dataset.version,
                      "--samples-per-shard", "4", "--workers", "1", "--json", str(path)]) == 0
    assert "total" in capsys.readouterr().out
    import json
    plan = json.loads(path.read_text())
    records = [r for s in ("train", "val") for r in read_manifest(str(out), s)]
    got = {}
    for r in records:
        g = got.setdefault(r.bucket, {"shards": 0, "samples": 0, "bytes": 0})
        g["shards"], g["samples"], g["bytes"] = g["shards"] + 1, g["samples"] + r.samples, g["bytes"] + r.bytes
    planned = {b: p for b, p in plan["buckets"].items() if p["clips"]}
    assert {b: p["clips"] for b, p in planned.items()} == summary.clips
    assert {b: (p["shards"], p["samples"]) for b, p in planned.items()} == \
        {b: (g["shards"], g["samples"]) for b, g in got.items()}
    for b, g in got.items():
        assert abs(planned[b]["bytes"] / g["bytes"] - 1) < 0.10, (b, planned[b]["bytes"], g["bytes"])
    assert plan["tflops"] > 0 and plan["gpu_hours"] > 0 and plan["decode_cpu_hours"] > 0


def test_capacity_plan_bad_input_is_one_error_line(tmp_path, capsys):
    from pipeline.shards.plan import main as plan_main
    assert plan_main(["--config", "demo", "--dataroot", str(tmp_path), "--version", "v1.0-nothere"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "v1.0-nothere" in err[0]


def test_build_command_stops_the_ray_it_started(synth_dataset, vae_dir, tmp_path):
    """The command as users run it, without a cluster: it starts a local Ray and stops every process of
    it before it returns. It stops Ray itself (not in Ray's exit hook) and kills the autoscaler monitor
    first, which a plain shutdown waited a second for: nothing of that Ray may be left behind."""
    from procs import cluster_processes
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": ray_tmp}
    try:
        r = subprocess.run([sys.executable, "pipeline/build.py", "--config", STAGE, "--dataroot", str(synth_dataset.root),
                            "--version", synth_dataset.version, "--out", str(tmp_path / "out"), "--vae", str(vae_dir),
                            "--cpus", "2", "--encode-cpus", "0.5", "--limit-scenes", "1", "--captions", "dataset",
                            "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "ray_stop" in r.stdout and glob.glob(f"{tmp_path}/out/*/*/shard-*.tar")
        assert any(Path(ray_tmp).rglob("raylet.out")), "the build's Ray did not use RAY_TMPDIR: the check is void"
        assert cluster_processes(ray_tmp) == {}
    finally:
        for pid in cluster_processes(ray_tmp):
            os.kill(pid, 9)
        shutil.rmtree(ray_tmp, ignore_errors=True)


# ---- exit codes a scheduler can trust (issue 23): a full disk, a caption server that fails every request ----------

def _build_cmd(data, vae, out, *extra) -> list[str]:
    """`python pipeline/build.py` with the arguments of `_build` (the same config hash as the reference)."""
    return [sys.executable, str(ROOT / "pipeline" / "build.py"), "--config", STAGE, "--dataroot", str(data.root),
            "--version", data.version, "--out", str(out), "--vae", str(vae), "--samples-per-shard", "4",
            "--no-progress", "--encode-cpus", "0.5", "--captions", "dataset", *extra]


def _can_mount_tmpfs() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _run_isolated(script: list[str], env: dict, ray_tmp: str) -> None:
    """Run `script` (argv) with its own Ray under ray_tmp, and stop whatever of that Ray is left afterwards."""
    from procs import cluster_processes
    try:
        subprocess.run(script, env={**env, "RAY_TMPDIR": ray_tmp}, cwd=ROOT, timeout=1200, check=True)
    finally:
        for pid in cluster_processes(ray_tmp):
            os.kill(pid, 9)


def test_a_full_disk_exits_3_marks_the_card_and_the_rerun_equals_a_clean_build(ref, synth_dataset, vae_dir,
                                                                               tmp_path):
    """A tmpfs of 6 MB holds the tables and scene stores (copied from the reference build) and some of the 12 MB of
    shards: the build stops at the first ENOSPC (not retried as a network error) with one line naming the path and
    the free space, exits 3, and the dataset card says INCOMPLETE with the counts; after the tmpfs grows the same
    command completes the build, byte for byte the reference. Without mount rights (a CI container) every process
    of the build sees a 6 MB disk through tests/faultfs/sitecustomize.py: write() past it raises the real
    OSError(ENOSPC), through the same write path."""
    out, _ = ref
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"OMP_NUM_THREADS": "1", "MDV2_DEBUG": "",
                                                                          "PYTHONPATH": str(ROOT)}
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    res = tmp_path / "res"
    res.mkdir()
    try:
        if not os.environ.get("MDV2_TEST_NO_TMPFS") and _can_mount_tmpfs():  # MDV2_TEST_NO_TMPFS=1: the other way
            mnt = tmp_path / "mnt"
            mnt.mkdir()
            q = " ".join(f"'{a}'" for a in _build_cmd(synth_dataset, vae_dir, mnt / "out"))
            work = f"{out}/{schema.WORK_DIR}"
            script = (f"mount -t tmpfs -o size=6m tmpfs {mnt} && mkdir -p {mnt}/out && cp -a {work} {mnt}/out/ && "
                      f"{{ {q} > {res}/1.out 2> {res}/1.err; echo $? > {res}/1.rc; cp -a {mnt}/out {res}/first; "
                      f"mount -o remount,size=64m {mnt}; {q} > {res}/2.out 2> {res}/2.err; echo $? > {res}/2.rc; "
                      f"cp -a {mnt}/out {res}/full; }}")
            _run_isolated(["unshare", "-rm", "sh", "-c", script], env, ray_tmp)
        else:
            shutil.copytree(out / schema.WORK_DIR, res / "full" / schema.WORK_DIR)
            for n, extra in (("1", {"PYTHONPATH": f"{ROOT / 'tests' / 'faultfs'}{os.pathsep}{ROOT}",
                                    "MDV2_TEST_DISK": f"{res / 'full'}:{6 * 10**6}"}), ("2", {})):
                with open(res / f"{n}.out", "w") as o, open(res / f"{n}.err", "w") as e:
                    r = subprocess.run(_build_cmd(synth_dataset, vae_dir, res / "full"), stdout=o, stderr=e, cwd=ROOT,
                                       env={**env, **extra, "RAY_TMPDIR": ray_tmp}, timeout=600)
                (res / f"{n}.rc").write_text(str(r.returncode))
                if n == "1":
                    shutil.copytree(res / "full", res / "first")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    err = (res / "1.err").read_text()
    assert int((res / "1.rc").read_text()) == 3, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "No space left on device (ENOSPC)" in errors[0] and "MB free of" in errors[0] \
        and "shard-0" in errors[0], errors
    assert "still failing after" not in err and "network" not in errors[0]          # not retried as a network error
    card = (res / "first" / schema.DATASET_CARD_FILE).read_text()
    assert "**Status: INCOMPLETE: " in card and " of 12 planned shards missing" in card, card[:600]
    assert int((res / "2.rc").read_text()) == 0, (res / "2.err").read_text()[-3000:]
    assert _digests(res / "full") == _digests(out)   # shards, manifests, quarantine: byte-identical
    assert (res / "full" / schema.DATASET_CARD_FILE).read_bytes() == (out / schema.DATASET_CARD_FILE).read_bytes()


def test_a_caption_server_that_fails_every_request_stops_the_build_with_exit_3(ref, synth_dataset, vae_dir, tmp_path):
    from procs import free_port
    out, _ = ref
    shutil.copytree(out / schema.WORK_DIR, tmp_path / "out" / schema.WORK_DIR)  # tables and stores: the captions fail
    cmd = _build_cmd(synth_dataset, vae_dir, tmp_path / "out", "--caption-base-url",
                     f"http://127.0.0.1:{free_port()}/v1", "--caption-timeout", "2", "--caption-retries", "1",
                     "--caption-concurrency", "2")
    cmd[cmd.index("dataset")] = "mllm"
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"OMP_NUM_THREADS": "1", "MDV2_DEBUG": "",
                                                                          "RAY_TMPDIR": ray_tmp}
    try:
        r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    finally:
        from procs import cluster_processes
        for pid in cluster_processes(ray_tmp):
            os.kill(pid, 9)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert r.returncode == 3, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "the first 8 caption requests all failed the same way (connection_error" in errors[0]
