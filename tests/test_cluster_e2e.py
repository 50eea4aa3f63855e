"""End to end on a real Ray cluster: `ray start --head` on loopback, `ray job submit --working-dir .`
running pipeline/build.py on the synthetic dataset, then faults: a killed task worker, a killed driver
(resume must give byte-identical output), output on an S3 server (the trainer streams it back), and the
preview's projected boxes checked against the synthetic renderer's pixels.

One Ray head serves the whole module. It is stopped by killing exactly the processes it started
(found by its private temp dir, plus their descendants); `ray stop` is not used because it stops
every Ray process of the user on the machine, including other people's.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.tools import inspect
from pipeline.contract import manifest, schema, storage
from pipeline.contract.shardio import iter_shard, sha256_bytes
from procs import cluster_processes
from s3_server import FaultProxy, free_port, s3_server  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 400
# One image bucket keeps each build short (keyframes of one 6 s scene: 12 clips, 4 shards of 3); the
# machinery under test (jobs, retries, resume, storage) is the same for video buckets.
BUCKET = dict(height=64, width=128, num_frames=1)
STAGE_YAML = ("name: e2e\nbuckets:\n  - {height: 64, width: 128, num_frames: 1, batch_size: 2}\n")
SAMPLES_PER_SHARD = 3


# ---- the cluster --------------------------------------------------------------------------------

def _kill(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class RayHead:
    def __init__(self, env: dict[str, str]):
        self.temp_dir = tempfile.mkdtemp(prefix="rc9", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
        self.port, self.dash_port = free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{self.dash_port}"
        self.env = {**os.environ, **env, "RAY_AUTH_MODE": "disabled", "RAY_DEDUP_LOGS": "0",
                    "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)

    def start(self) -> "RayHead":
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--port", str(self.port),
               "--num-cpus", "2", "--disable-usage-stats", "--include-dashboard=true", "--dashboard-host",
               "127.0.0.1", "--dashboard-port", str(self.dash_port), "--temp-dir", self.temp_dir]
        # every fixed default port could be taken by another Ray on this machine (other tests, other users)
        for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                     "--runtime-env-agent-port", "--ray-client-server-port", "--node-manager-port",
                     "--object-manager-port"):
            cmd += [flag, str(free_port())]
        atexit.register(self.stop)  # also when pytest is interrupted before fixture teardown
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=180)
        if r.returncode:
            self.stop()
            raise RuntimeError(f"ray start failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        self.gcs = next(line.split("--address=")[1].strip(" '\x1b[22m") for line in r.stdout.splitlines()
                        if "ray start --address=" in line)
        self.gcs = self.gcs.split("'")[0]
        return self

    def ray(self, *args: str, timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], env=self.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        procs = cluster_processes(self.temp_dir)
        _kill(procs, signal.SIGTERM)
        # 2 s of grace, then SIGKILL: terminated together, the GCS server waits ~20 s for peers that are
        # already gone (measured), and nothing of this test's outcome depends on a graceful exit
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and cluster_processes(self.temp_dir):
            time.sleep(0.3)
        _kill(cluster_processes(self.temp_dir), signal.SIGKILL)
        time.sleep(0.5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def head(s3_server):  # noqa: F811
    """A real Ray head on loopback (2 CPUs, dashboard on), with the S3 server's env for its workers."""
    h = RayHead(s3_server.env)
    try:
        yield h.start()
    finally:
        h.stop()
    assert not cluster_processes(h.temp_dir), "Ray processes survived the stop"


@pytest.fixture(scope="module")
def inputs(synth_dataset, tmp_path_factory):
    from pipeline.shards.vae import write_tiny_vae
    d = tmp_path_factory.mktemp("e2e")
    stage = d / "e2e.yaml"
    stage.write_text(STAGE_YAML)
    vae = write_tiny_vae(d / "vae")
    return dict(stage=str(stage), vae=vae, dataroot=str(synth_dataset.root), version=synth_dataset.version,
                scene=sorted(synth_dataset.scene_names)[0])


def build_args(inputs: dict, out: str) -> list[str]:
    return ["pipeline/build.py", "--config", inputs["stage"], "--dataroot", inputs["dataroot"], "--version",
            inputs["version"], "--out", out, "--vae", inputs["vae"], "--scenes", inputs["scene"],
            "--samples-per-shard", str(SAMPLES_PER_SHARD), "--no-progress"]


def submit(head: RayHead, inputs: dict, out: str, env_vars: dict[str, str] | None = None) -> str:
    """`ray job submit --no-wait --working-dir .`; returns the submission id."""
    runtime_env = {"excludes": [".venv", ".git", "bench/results"], "env_vars": env_vars or {}}
    deadline = time.monotonic() + 180
    while True:
        r = head.ray("job", "submit", "--address", head.dashboard, "--no-wait", "--working-dir", ".",
                     "--runtime-env-json", json.dumps(runtime_env),
                     "--", sys.executable, *build_args(inputs, out), timeout=120)
        # a fresh head answers "No available agent" until its dashboard agent has registered
        if r.returncode == 0 or "No available agent" not in r.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert r.returncode == 0, r.stdout + r.stderr
    return next(w for w in (r.stdout + r.stderr).split() if w.strip("'").startswith("raysubmit_")).strip("'")


def job_status(head: RayHead, job: str) -> str:
    from ray.job_submission import JobSubmissionClient
    return str(JobSubmissionClient(head.dashboard).get_job_status(job).value)


def wait_job(head: RayHead, job: str, timeout: float = JOB_TIMEOUT_S) -> str:
    deadline = time.monotonic() + timeout
    status = "?"
    while time.monotonic() < deadline:
        status = job_status(head, job)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(1)
    if status != "SUCCEEDED":
        logs = head.ray("job", "logs", "--address", head.dashboard, job, timeout=60)
        pytest.fail(f"job {job} ended {status}:\n{logs.stdout[-6000:]}\n{logs.stderr[-2000:]}")
    return status


# ---- checks -------------------------------------------------------------------------------------

def splits(out: str) -> list[str]:
    return sorted(u.rstrip("/").split("/")[-2] for u in storage.glob(storage.join(out, "*", "manifest.parquet")))


def validate_output(out: str) -> dict[str, bytes]:
    """Every manifest row names a whole shard (size, sha256, keys, valid samples); no other shard or temp file
    exists; each clip of the index is in exactly one shard. Returns {relative path: bytes} of all outputs."""
    files: dict[str, bytes] = {}
    keys: list[str] = []
    for split in splits(out):
        for r in manifest.read_manifest(out, split):
            data = storage.read_bytes(storage.join(out, r.path))
            assert len(data) == r.bytes and sha256_bytes(data) == r.sha256, r.path
            got = []
            for key, members in iter_shard(data):
                schema.decode_sample(members, key=key)
                got.append(key)
            assert got == list(r.keys) and len(got) == r.samples, r.path
            keys += got
            files[r.path] = data
        files[schema.manifest_path(split)] = storage.read_bytes(storage.join(out, schema.manifest_path(split)))
    listed = {storage.join(out, p) for p in files if p.endswith(".tar")}
    on_disk = set(storage.glob(storage.join(out, "*", "*", "*.tar")))
    assert on_disk == listed, f"shards not in a manifest: {sorted(on_disk - listed)}"
    leftovers = [u for u in storage.glob(storage.join(out, "**")) if storage.TMP_MARK in u]
    assert not leftovers, leftovers
    assert len(keys) == len(set(keys)), "a sample is in two shards"
    clips = manifest.read_table(storage.join(out, schema.CLIP_INDEX_FILE)).to_pylist()
    quarantined = {q.item for q in manifest.read_quarantine(out)}
    expected = {c["key"] for c in clips if c["bucket"] == schema.bucket_name(**BUCKET)} - quarantined
    assert expected and set(keys) == expected
    return files


@pytest.fixture(scope="module")
def reference(head, inputs, s3_server):  # noqa: F811
    """The uninterrupted build, submitted as a Ray job, writing to the S3 server through an endpoint whose
    first connections fail with HTTP 500 (transient storage failures during the build)."""
    import fsspec
    fsspec.filesystem("s3").mkdir("e2e-out")
    out = "s3://e2e-out/build"
    with FaultProxy(s3_server.port, fail_first=6) as proxy:
        job = submit(head, inputs, out, env_vars={"AWS_ENDPOINT_URL": proxy.endpoint_url})
        wait_job(head, job)
    logs = head.ray("job", "logs", "--address", head.dashboard, job, timeout=60).stdout
    print(f"\nreference build: {proxy.failed} of {proxy.connections} S3 connections failed with HTTP 500")
    return dict(out=out, files=validate_output(out), job=job, logs=logs, failed=proxy.failed)


def test_job_submit_end_to_end(reference, head):
    """Job SUCCEEDED despite the injected storage failures; every listed shard is whole (validate_output)."""
    assert reference["failed"] == 6
    files = reference["files"]
    n = sum(len(manifest.read_manifest(reference["out"], s)) for s in splits(reference["out"]))
    assert n >= 2 and sum(1 for p in files if p.endswith(".tar")) == n
    assert "shards" in reference["logs"]  # the driver's summary reached `ray job logs`
    import urllib.request
    with urllib.request.urlopen(f"{head.dashboard}/api/jobs/", timeout=30) as r:  # the dashboard knows the job
        assert any(j.get("submission_id") == reference["job"] and j["status"] == "SUCCEEDED" for j in json.load(r))


def test_killed_task_worker_is_retried(head, inputs, reference, tmp_path):
    """SIGKILL the worker process running a task mid-build, once per task kind seen (scene, frames, shard),
    and the VAE actor process: Ray retries the tasks (default max_retries for system failures), restarts the
    actor and retries its calls (max_restarts / max_task_retries set by the build), and the output equals the
    uninterrupted build: no sample lost to quarantine."""
    out = str(tmp_path / "out")
    job = submit(head, inputs, out)
    kinds = ("ray::scene_task", "ray::frames_task", "ray::shard_task", "ray::EncodeActor")
    killed: dict[str, int] = {}
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while len(killed) < len(kinds) and time.monotonic() < deadline and job_status(head, job) in ("PENDING", "RUNNING"):
        for pid, cmd in cluster_processes(head.temp_dir).items():
            kind = cmd.split()[0].split(".")[0] if cmd else ""  # "ray::EncodeActor.run" -> the actor
            if kind == "ray::EncodeActor" and "." not in cmd.split()[0]:
                continue  # kill the actor while it runs a call, not while it is idle
            if kind in kinds and kind not in killed:
                os.kill(pid, signal.SIGKILL)
                killed[kind] = pid
        time.sleep(0.05)
    assert killed, "no task worker was seen running"
    assert "ray::EncodeActor" in killed, f"the VAE actor was never seen encoding (killed {killed})"
    print(f"\nkilled task workers mid-build: {killed}")
    wait_job(head, job)
    files = validate_output(out)
    assert files == reference["files"], f"killed {killed}: output differs from the uninterrupted build"


def test_killed_driver_resumes_byte_identical(head, inputs, reference, tmp_path):
    """SIGKILL the build driver once a manifest lists its first shard; the re-run resumes (skips what the
    manifest lists) and the final output is byte-identical to the uninterrupted build."""
    out = str(tmp_path / "out")
    env = {**head.env, "RAY_ADDRESS": head.gcs}
    driver = subprocess.Popen([sys.executable, *build_args(inputs, out)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        listed = 0
        while time.monotonic() < deadline and driver.poll() is None:
            listed = sum(len(manifest.read_manifest(out, s)) for s in splits(out)) if splits(out) else 0
            if listed:
                break
            time.sleep(0.2)
        assert driver.poll() is None, f"the build ended before it could be killed:\n{driver.stdout.read()[-3000:]}"
        driver.kill()
        driver.wait(30)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(30)
    total = sum(1 for p in reference["files"] if p.endswith(".tar"))
    assert 1 <= listed < total
    print(f"\nkilled the driver (pid {driver.pid}) with {listed} of {total} shards in the manifest")
    rerun = subprocess.run([sys.executable, *build_args(inputs, out)], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=JOB_TIMEOUT_S)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "already complete" in rerun.stdout
    assert validate_output(out) == reference["files"]


def test_trainer_streams_the_s3_build(reference, inputs):
    """The reference build went to s3://; the trainer's loader lists it from the manifest and streams batches."""
    from train.config import DataConfig
    from train.data import BatchStream, find_shards
    out = reference["out"]
    split = splits(out)[0]
    cfg = DataConfig(root=out, split=split, stage=inputs["stage"])
    shards = find_shards(cfg, split, [])
    assert all(u.startswith(f"{out}/") for urls in shards.urls.values() for u in urls)
    assert sum(shards.samples.values()) == sum(r.samples for r in manifest.read_manifest(out, split))
    batches = list(BatchStream(shards, cfg, seed=0, stop_step=3))
    assert len(batches) == 3
    assert all(b.bucket == schema.bucket_name(**BUCKET) for b in batches)


# ---- the preview against the renderer's pixels ----------------------------------------------------

DISTINCT = ("car", "bus", "bicycle", "motorcycle", "pedestrian", "trailer")  # colours no map layer shares


def class_pixels(img: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    """(H, W) bool: pixels whose colour is a shade of `rgb` (direction within ~10 degrees, saturated)."""
    x = img.astype(np.float64)
    c = np.asarray(rgb, np.float64)
    cos = (x @ c) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(c) + 1e-9)
    return (cos > 0.985) & (x.max(-1) - x.min(-1) > 40)


def outline_encloses(img: np.ndarray, uv: np.ndarray, rgb: tuple[int, int, int]) -> tuple[int, float]:
    """(object pixels near the box, fraction of them inside the projected outline's hull, 2 px dilated)."""
    h, w = img.shape[:2]
    lo = np.clip(np.floor(uv.min(0)).astype(int) - 2, 0, [w, h])
    hi = np.clip(np.ceil(uv.max(0)).astype(int) + 3, 0, [w, h])
    obj = class_pixels(img, rgb)
    near = np.zeros((h, w), bool)
    near[lo[1]:hi[1], lo[0]:hi[0]] = True
    hull = np.zeros((h, w), np.uint8)
    cv2.fillConvexPoly(hull, cv2.convexHull(np.round(uv).astype(np.int32)), 1)
    hull = cv2.dilate(hull, np.ones((5, 5), np.uint8)).astype(bool)  # JPEG chroma + resize bleed ~2 px
    p = obj & near
    return int(p.sum()), float((p & hull).sum() / max(1, p.sum()))


def _clean(uv: np.ndarray, depth: np.ndarray, rects: list, shape: tuple, own: int) -> bool:
    """Fully in front of the camera and inside the image, and its rectangle overlaps no other box's (whose
    pixels would make the check ambiguous); `own` = how many of `rects` are its own."""
    h, w = shape[:2]
    if (depth < 1).any() or (uv[:, 0] < 0).any() or (uv[:, 0] >= w).any() or (uv[:, 1] < 0).any() or (uv[:, 1] >= h).any():
        return False
    lo, hi = uv.min(0) - 2, uv.max(0) + 2
    return sum(bool(np.all(lo < h2) and np.all(l2 < hi)) for l2, h2 in rects) <= own


def pixel_check(files: dict[str, bytes], dataroot: str) -> dict[str, float]:
    """Projected outlines vs. the renderer's pixels of each box's class colour, over every sample and view."""
    import dataclasses
    r = dict(checked=0, ok=0, pixels=0, pixels_inside=0.0, controls=0, controls_ok=0)
    for path in sorted(p for p in files if p.endswith(".tar")):
        for key, members in iter_shard(files[path]):
            s = schema.decode_sample(members, key=key)
            for t in inspect.preview_frames(s.num_frames):
                for v in range(len(s.views)):
                    img = inspect.source_frame(dataroot, s.meta["frames"][t][v], s.meta["width"], s.meta["height"])
                    outlines = inspect.box_outlines(s, t, v)
                    rects = [(uv.min(0) - 2, uv.max(0) + 2) for _, uv, depth in outlines if (depth > 0).all()]
                    for n, uv, depth in outlines:
                        if schema.OBJECT_CLASSES[int(s.box_class[n])] not in DISTINCT:
                            continue
                        if not _clean(uv, depth, rects, img.shape, own=1):
                            continue
                        rgb = inspect.CLASS_RGB[int(s.box_class[n])]
                        count, frac = outline_encloses(img, uv, rgb)
                        if count < 6:  # too small at this resolution, or hidden
                            continue
                        r["checked"] += 1
                        r["ok"] += frac >= 0.9
                        r["pixels"] += count
                        r["pixels_inside"] += frac * count
                        # controls: the box moved by its size + 1.5 m to either side, ahead and behind; each
                        # spot that is empty (clean) must not show an object of its colour inside the outline
                        for ang, size in ((np.pi / 2, 3), (-np.pi / 2, 3), (0.0, 4), (np.pi, 4)):
                            moved = s.view_boxes.copy()          # the preview draws each view's own boxes
                            d = moved[t, v, n, 6] + ang
                            moved[t, v, n, :2] += (moved[t, v, n, size] + 1.5) * np.array([np.cos(d), np.sin(d)])
                            (_, uv2, d2), = [o for o in inspect.box_outlines(dataclasses.replace(s, view_boxes=moved),
                                                                             t, v) if o[0] == n]
                            if not _clean(uv2, d2, rects, img.shape, own=0):
                                continue
                            c2, f2 = outline_encloses(img, uv2, rgb)
                            r["controls"] += 1
                            r["controls_ok"] += c2 >= 6 and f2 >= 0.9
    return r


def test_projected_boxes_enclose_rendered_objects(reference, inputs, tmp_path):
    r = pixel_check(reference["files"], inputs["dataroot"])
    print(f"\npixel check: {r}")
    assert r["checked"] >= 5, r
    # the outline holds >= 90 % of its object's pixels for >= 85 % of boxes, and >= 90 % of all object pixels
    assert r["ok"] >= 0.85 * r["checked"] and r["pixels_inside"] >= 0.9 * r["pixels"], r
    # the same outline moved to an empty spot encloses no such object
    assert r["controls"] >= 3 and r["controls_ok"] <= 0.2 * r["controls"], r
    out = reference["out"]
    png = tmp_path / "preview.png"
    first = sorted(p for p in reference["files"] if p.endswith(".tar"))[0]
    assert inspect.main([storage.join(out, first), "--dataroot", inputs["dataroot"], "--png", str(png)]) == 0
    assert png.stat().st_size > 10_000
