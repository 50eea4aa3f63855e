"""Exit codes a scheduler can trust: the build on a full disk (a real small tmpfs, or where no mount is allowed a
disk that fills through tests/faultfs), a caption server that fails every request, and two builds on one --out."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.contract import schema
from pipeline.contract.outlock import OutputLock, OutputLocked
from tests.procs import free_port

ROOT = Path(__file__).resolve().parents[1]
STAGE = str(ROOT / "tests" / "data" / "build_test_stage.yaml")


def _build_cmd(data, vae, out, *extra) -> list[str]:
    return [sys.executable, str(ROOT / "pipeline" / "build.py"), "--config", STAGE, "--dataroot", str(data.root),
            "--version", data.version, "--out", str(out), "--vae", str(vae), "--samples-per-shard", "4",
            "--no-progress", "--encode-cpus", "0.5", "--captions", "dataset", *extra]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MDV2_DEBUG="")


def _digests(out) -> dict[str, str]:
    files = sorted(glob.glob(f"{out}/*/*/shard-*.tar") + glob.glob(f"{out}/*/manifest.parquet")
                   + [f"{out}/{schema.QUARANTINE_FILE}", f"{out}/{schema.DATASET_CARD_FILE}"])
    return {os.path.relpath(f, out): hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files}


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    from pipeline.shards.vae import write_tiny_vae
    return write_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-cogvae")


def _can_mount_tmpfs() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow
def test_a_full_disk_exits_3_marks_the_card_and_the_rerun_equals_a_clean_build(synth_dataset, vae, tmp_path):
    """A tmpfs of 6 MB holds the tables, scene stores and some of the 12 MB of shards: the build stops at the
    first ENOSPC (not retried as a network error) with one line naming the path and the free space, exits 3,
    and the dataset card says INCOMPLETE; after the tmpfs grows, the same command completes the build, byte
    for byte the clean build. Without mount rights (CI containers) every process of the build sees a 6 MB disk
    through tests/faultfs/sitecustomize.py: write() past it raises the real OSError(ENOSPC)."""
    clean = tmp_path / "clean"
    r = subprocess.run(_build_cmd(synth_dataset, vae, clean), env=_env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    full = tmp_path / "full"
    if not os.environ.get("MDV2_TEST_NO_TMPFS") and _can_mount_tmpfs():  # MDV2_TEST_NO_TMPFS=1: the other way
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        q = " ".join(f"'{a}'" for a in _build_cmd(synth_dataset, vae, mnt / "out"))
        script = (f"mount -t tmpfs -o size=6m tmpfs {mnt} && {{ {q} > {tmp_path}/1.out 2> {tmp_path}/1.err; "
                  f"echo $? > {tmp_path}/1.rc; cp -a {mnt}/out {tmp_path}/first; mount -o remount,size=64m {mnt}; "
                  f"{q} > {tmp_path}/2.out 2> {tmp_path}/2.err; echo $? > {tmp_path}/2.rc; cp -a {mnt}/out {full}; }}")
        subprocess.run(["unshare", "-rm", "sh", "-c", script], env=_env(), cwd=ROOT, timeout=1200, check=True)
        first_rc, err = int((tmp_path / "1.rc").read_text()), (tmp_path / "1.err").read_text()
        second_rc, err2 = int((tmp_path / "2.rc").read_text()), (tmp_path / "2.err").read_text()
        first, words = tmp_path / "first", "No space left on device (ENOSPC)"
    else:  # no mount rights: the same real write path, with ENOSPC from write() past 6 MB (tests/faultfs)
        env = dict(_env(), PYTHONPATH=f"{ROOT / 'tests' / 'faultfs'}{os.pathsep}{ROOT}",
                   MDV2_TEST_DISK=f"{full}:{6 * 10**6}")
        r1 = subprocess.run(_build_cmd(synth_dataset, vae, full), env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
        first_rc, err, first = r1.returncode, r1.stderr, tmp_path / "first"
        shutil.copytree(full, first)
        words = "No space left on device (ENOSPC)"
        r2 = subprocess.run(_build_cmd(synth_dataset, vae, full), env=_env(), cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
        second_rc, err2 = r2.returncode, r2.stderr
    assert first_rc == 3, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and words in errors[0] and "MB free of" in errors[0] and "shard-0" in errors[0], errors
    assert "still failing after" not in err and "network" not in errors[0]          # not retried as a network error
    card = (first / schema.DATASET_CARD_FILE).read_text()
    assert "**Status: INCOMPLETE: " in card and " of 12 planned shards missing" in card, card[:600]
    assert second_rc == 0, err2[-3000:]
    assert _digests(full) == _digests(clean)   # shards, manifests, quarantine and the card: byte-identical


def test_local_disk_errors_are_not_retried_and_name_the_path_and_free_space(tmp_path, monkeypatch):
    """The storage layer's own write path: an OSError(ENOSPC) from the write is raised at once as
    LocalIOError, with the path and the free space, where a network error would be retried."""
    import errno
    from pipeline.contract import storage
    calls = []
    real = storage._atomic_write_local

    def full(path, data):
        calls.append(path)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(storage, "_atomic_write_local", full)
    with pytest.raises(storage.LocalIOError, match=r"writing .*x\.bin: No space left on device \(ENOSPC\); "
                                                   r"[\d.]+ MB free of [\d.]+ MB on the filesystem of"):
        storage.atomic_write(str(tmp_path / "x.bin"), b"abc")
    assert len(calls) == 1
    flaky = iter([OSError(errno.ESTALE, "Stale file handle")])

    def nfs(path, data):  # a network filesystem's hiccup is retried
        e = next(flaky, None)
        if e:
            raise e
        real(path, data)
    monkeypatch.setattr(storage, "_atomic_write_local", nfs)
    monkeypatch.setattr(storage, "BACKOFF_S", 0.0)
    storage.atomic_write(str(tmp_path / "y.bin"), b"abc")
    assert (tmp_path / "y.bin").read_bytes() == b"abc"


@pytest.mark.slow
def test_a_caption_server_that_fails_every_request_stops_the_build_with_exit_3(synth_dataset, vae, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    cmd = _build_cmd(synth_dataset, vae, tmp_path / "out", "--caption-base-url", dead, "--caption-timeout", "2",
                     "--caption-retries", "1", "--caption-concurrency", "2")
    cmd[cmd.index("dataset")] = "mllm"
    r = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 3, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "the first 8 caption requests all failed the same way (connection_error" in errors[0]


# ---- one writer per --out ---------------------------------------------------------------------------------------

HOLD = ("import sys, time\nfrom pipeline.contract.outlock import OutputLock\n"
        "lock = OutputLock(sys.argv[1], 'build').acquire()\nprint('held', flush=True)\ntime.sleep(120)\n")


def _holder(out) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_build_on_an_out_in_use_is_refused_naming_the_holder(tmp_path, capsys):
    from pipeline.build import main
    out = tmp_path / "out"
    holder = _holder(out)
    try:
        rc = main(["--config", "demo", "--dataroot", str(tmp_path / "nowhere"), "--version", "v1.0-synth", "--out",
                   str(out), "--vae", str(tmp_path / "vae"), "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, err
        assert f"is in use by a build on host {socket.gethostname()}, pid {holder.pid}" in err[0], err
        from captions.cli import main as caption_main   # the re-captioner rewrites shards: refused too
        assert caption_main(["shards", "--out", str(out), "--mode", "none", "--quiet"]) == 2
        assert f"pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is stale (pid gone) and is taken over with a warning
    with OutputLock(str(out)) as lock:
        assert json.loads((out / schema.LOCK_FILE).read_text())["pid"] == os.getpid() and lock.held
        assert "taking over the stale lock" in capsys.readouterr().err
    assert not (out / schema.LOCK_FILE).exists()     # released


def test_a_lock_of_another_host_is_stale_only_when_its_heartbeat_is_old(tmp_path, capsys):
    out = tmp_path / "out"
    (out / schema.WORK_DIR).mkdir(parents=True)
    other = {"host": "node-17.cluster", "pid": 4242, "what": "build", "started": "2026-01-01T00:00:00",
             "heartbeat": time.time() - 30, "token": "x"}
    (out / schema.LOCK_FILE).write_text(json.dumps(other))
    with pytest.raises(OutputLocked, match="in use by a build on host node-17.cluster, pid 4242"):
        OutputLock(str(out), stale_after_s=600).acquire()
    other["heartbeat"] = time.time() - 3600
    (out / schema.LOCK_FILE).write_text(json.dumps(other))
    lock = OutputLock(str(out), stale_after_s=600).acquire()
    try:
        err = capsys.readouterr().err
        assert "taking over the stale lock" in err and "its heartbeat is 3600 s old" in err, err
    finally:
        lock.release()


def test_the_holder_refreshes_its_heartbeat(tmp_path):
    lock = OutputLock(str(tmp_path / "out"), heartbeat_s=0.05).acquire()
    try:
        first = json.loads((tmp_path / "out" / schema.LOCK_FILE).read_text())["heartbeat"]
        deadline = time.monotonic() + 30
        while json.loads((tmp_path / "out" / schema.LOCK_FILE).read_text())["heartbeat"] == first:
            assert time.monotonic() < deadline, "no heartbeat"
            time.sleep(0.05)
    finally:
        lock.release()
