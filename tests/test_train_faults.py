"""The trainer under the faults clusters have: a readable-sample guard that counts what it must, SIGTERM ->
finish the step, checkpoint, exit 4 (and --resume continues exactly), a stopped or dead DataLoader worker ->
one line naming it and its shards, exit 5; under torchrun every rank stops after the same step."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.factories import write_shards
from tests.procs import free_port
from tests.factories_train import STAGE_TWO_BUCKETS, TEST_VIEWS
from tests.factories_train import train_config as config
from train import checkpoint as ckpt
from train.config import DataConfig
from train.data import BatchStream, find_shards, make_loader
from train.train import train

REPO = Path(__file__).resolve().parents[1]
STAGE = STAGE_TWO_BUCKETS
VIEWS = TEST_VIEWS


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_guard_counts_samples_not_draws_with_one_sample_shards(tmp_path, workers):
    """Shards of 1 sample and the default shuffle buffer (32): main's guard counted shard draws while the buffer
    filled and stopped intact runs ('no readable sample in 13 shard draws'); every batch must come."""
    write_shards(tmp_path, {(32, 64, 1): 3}, per_shard=1, views=["CAM_FRONT"], num_boxes=1)
    (tmp_path / "stage.yaml").write_text("name: t\nbuckets:\n  - {height: 32, width: 64, num_frames: 1, batch_size: 2}\n")
    cfg = DataConfig(root=str(tmp_path), stage=str(tmp_path / "stage.yaml"), num_workers=workers, samples_per_chunk=64)
    assert cfg.shuffle_buffer == 32
    batches = list(make_loader(BatchStream(find_shards(cfg, "train", []), cfg, seed=0, stop_step=8)))
    assert [b.step for b in batches] == list(range(8))
    assert len({k for b in batches for k in b.keys}) == 3


def test_guard_still_stops_a_bucket_whose_every_shard_is_unreadable(tmp_path):
    write_shards(tmp_path, {(32, 64, 1): 2}, per_shard=1, views=["CAM_FRONT"], num_boxes=1)
    for p in tmp_path.rglob("*.tar"):
        p.write_bytes(b"not a tar" * 100)
    (tmp_path / "stage.yaml").write_text("name: t\nbuckets:\n  - {height: 32, width: 64, num_frames: 1, batch_size: 2}\n")
    cfg = DataConfig(root=str(tmp_path), stage=str(tmp_path / "stage.yaml"), samples_per_chunk=64)
    with pytest.raises(RuntimeError, match=r"no readable sample in 15 shard reads in a row of the 2 shards"):
        next(iter(BatchStream(find_shards(cfg, "train", []), cfg, seed=0, stop_step=1)))


LEAVE_EARLY = """
import sys
from train.config import DataConfig
from train.data import BatchStream, find_shards, make_loader
root = sys.argv[1]
cfg = DataConfig(root=root, stage=root + "/stage.yaml", num_workers=2, samples_per_chunk=8, worker_ring_mb=1)
loader = iter(make_loader(BatchStream(find_shards(cfg, "train", []), cfg, seed=0)))
next(loader)   # workers keep producing into a ring nobody empties; the process leaves without closing the loader
print("left", flush=True)
"""


def test_a_process_that_leaves_its_loader_early_still_exits(tmp_path):
    """Workers ignore SIGTERM (so a scheduler's signal cannot kill them mid-step): torch's own fallback, terminate,
    cannot end them then, and multiprocessing's exit would wait forever on one blocked on a full ring slot.
    train/watchdog.py kills them instead."""
    write_shards(tmp_path, {(32, 64, 1): 8}, per_shard=2, views=["CAM_FRONT"], num_boxes=1)
    (tmp_path / "stage.yaml").write_text("name: t\nbuckets:\n  - {height: 32, width: 64, num_frames: 1, batch_size: 2}\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", LEAVE_EARLY, str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0 and r.stdout.strip() == "left", r.stderr[-2000:]


# ---- the trainer as a scheduler runs it ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    write_shards(root / "shards", {(32, 64, 1): 8, (32, 64, 9): 4}, per_shard=2, views=VIEWS, num_boxes=3)
    (root / "stage.yaml").write_text(STAGE)
    from model.text import T5TextEncoder, TextEmbeddingCache, read_captions, write_tiny_t5
    write_tiny_t5(root / "t5")
    TextEmbeddingCache(root / "text_cache").build(read_captions(str(root / "shards")),
                                                  T5TextEncoder(root / "t5", max_length=16), progress=False)
    return root


def _argv(cfg, steps: int, *extra: str) -> list[str]:
    return ["--no-progress", "--out", cfg.out, "--steps", str(steps), "--data-root", cfg.data.root,
            "--stage", cfg.data.stage, "--text-cache", cfg.data.text_cache, "--set", "lr=2e-3", "--set", "eps=1e-8", "--set", "warmup=3",
            "--set", "ema_decay=0.9", "--set", "val_every=0", "--set", "ckpt_every=1000",
            "--set", "data.samples_per_chunk=6", "--set", "data.shuffle_buffer=3", "--set", "data.text_max_length=16",
            *extra]


def _start(args: list[str], module: str = "train.train", launcher: list[str] = ()) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, *launcher, "-m", module, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(log: Path, n: int, proc: subprocess.Popen, limit_s: float = 240) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        if log.exists() and len(log.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer ended early (rc {proc.returncode}): {proc.stderr.read()[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"no {n} steps in {log} after {limit_s} s")


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return sorted(kids)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigterm_mid_run_checkpoints_exits_4_and_resume_equals_uninterrupted(data):
    """SIGTERM to every process of the job, as SLURM's scancel sends it (DataLoader workers included: they ignore
    it, so the main process finishes its step instead of dying on 'DataLoader worker killed by signal'): exit 4,
    a checkpoint of the last step, and --resume gives the weights of an uninterrupted run."""
    cfg = config(data, "term", 200)
    proc = _start(_argv(cfg, 200, "--set", "data.num_workers=2"))
    try:
        _wait_for_steps(Path(cfg.out) / "log.jsonl", 2, proc)
        for pid in [proc.pid, *_children(proc.pid)]:
            os.kill(pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 4, err[-3000:]
    assert "got SIGTERM: finishing this step" in err and "continue with --resume" in err
    stopped = ckpt.load_state(cfg.out)["step"]
    log = [json.loads(line) for line in (Path(cfg.out) / "log.jsonl").read_text().splitlines()]
    assert 2 <= stopped < 200 and [r["step"] for r in log] == list(range(1, stopped + 1))  # nothing lost, no gap

    from train.train import main
    before = signal.getsignal(signal.SIGTERM)
    assert main(["--out", cfg.out, "--resume", "--steps", str(stopped + 2), "--no-progress"]) == 0
    torch.set_num_threads(1)
    ref = config(data, "ref", stopped + 2)
    ref.data.num_workers = 2
    train(ref, progress=False)
    a, b = ckpt.resolve(data / "ref"), ckpt.resolve(cfg.out)
    assert a.name == b.name == f"step-{stopped + 2:07d}"
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    assert signal.getsignal(signal.SIGTERM) is before  # main gave the handlers back (Ray's, if a test started Ray)


@pytest.mark.parametrize("how", ["stop", pytest.param("kill", marks=pytest.mark.slow)])
def test_a_stopped_or_dead_worker_ends_the_run_with_one_line_exit_5(data, how):
    cfg = config(data, f"worker-{how}", 200)
    proc = _start(_argv(cfg, 200, "--set", "data.num_workers=2", "--set", "data.worker_timeout_s=5"))
    victim = None
    try:
        _wait_for_steps(Path(cfg.out) / "log.jsonl", 1, proc)
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        victim = workers[-1]
        os.kill(victim, signal.SIGSTOP if how == "stop" else signal.SIGKILL)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
        if victim is not None and _alive(victim):
            os.kill(victim, signal.SIGKILL)
    assert proc.returncode == 5, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: data worker ") and f"(pid {victim})" in line, line
    assert "its shards: " + cfg.data.root in line and "shard-0000" in line, line
    if how == "stop":
        assert "produced no batch for 5 s" in line and not _alive(victim), line   # killed, not left stopped
    else:
        assert "died (killed by signal" in line, line


def _torchrun_then_signal_rank_1(cfg, sig: int) -> str:
    """torchrun, 2 ranks; after 2 steps signal rank 1 (found by its RANK variable) only; torchrun's stderr."""
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())]
    proc = _start(_argv(cfg, 200), launcher=launcher)
    try:
        _wait_for_steps(Path(cfg.out) / "log.jsonl", 2, proc)
        ranks = {}
        for pid in _children(proc.pid):
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = next((int(e[5:]) for e in environ if e.startswith(b"RANK=")), None)
            if rank is not None:
                ranks[rank] = pid
        os.kill(ranks[1], sig)
        return proc.communicate(timeout=240)[1]
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_under_torchrun_a_signal_to_one_rank_stops_every_rank_after_the_same_step(data):
    cfg = config(data, "ddp-term", 200)
    err = _torchrun_then_signal_rank_1(cfg, signal.SIGTERM)  # rank 0 must learn it through the per-step all-reduce
    stopped = ckpt.load_state(cfg.out)["step"]
    assert err.count("got SIGTERM") == 1, err[-3000:]                             # one rank got the signal...
    assert err.count(f"stopped by SIGTERM after step {stopped}") == 2, err[-3000:]  # ...both stopped after it
    codes = [line.split(":", 1)[1].split()[0] for line in err.splitlines() if line.strip().startswith("exitcode")]
    assert codes and set(codes) == {"4"}, err[-2000:]  # torchrun itself exits 1; its summary names each rank's 4
    log = [json.loads(line) for line in (Path(cfg.out) / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == stopped and ckpt.load_state(cfg.out)["data"]["world"] == 2


@pytest.mark.slow
def test_under_torchrun_a_dead_peer_is_one_line_and_exit_5_on_the_survivor(data):
    cfg = config(data, "ddp-peer", 200)
    err = _torchrun_then_signal_rank_1(cfg, signal.SIGKILL)
    assert "error: a peer rank failed (" in err, err[-3000:]
    codes = {line.split(":", 1)[1].split()[0] for line in err.splitlines() if line.strip().startswith("exitcode")}
    assert codes == {"5", "-9"}, err[-2000:]
