"""Exit codes a scheduler can trust: local disk errors are not retried as network errors and name the path and the
free space; two builds on one --out. (The full disk and the caption server that fails every request, end to end:
tests/test_build_e2e.py, which has a reference build to compare with.)"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.contract import schema
from pipeline.contract.outlock import OutputLock, OutputLocked

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MDV2_DEBUG="")


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
