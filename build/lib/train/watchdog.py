"""A DataLoader worker that stops producing, or dies, ends the run with one line naming it: exit 5 (and so
does a peer rank that died: its collective fails here).

Without this a stopped worker (SIGSTOP, a read blocked on a dead mount or object store, a deadlock)
hangs the run silently once the prefetched batches are used, and a dead one surfaces as torch's
"DataLoader worker (pid X) exited unexpectedly" with no word of which shards it was reading.

- The DataLoader gets ``timeout=data.worker_timeout_s``: no batch in that time raises in the main
  process. The worker that owes the batch is known (the stream of step s is ``s % streams``,
  train/data.py, and batches arrive in step order), so is what it reads: the shards of that step's
  bucket for its stream. The stalled worker is killed (SIGKILL: a stopped process ignores SIGTERM until
  it is continued) so that the DataLoader's shutdown does not wait on it.
- A worker that dies: torch raises "DataLoader worker (pid ...)" from its SIGCHLD handler, inside the
  wait for a batch or anywhere in the step; :func:`explain` turns either into the same one line.
The trainer prints ``error: <line>`` and exits ``EXIT_WORKER`` (docs/cluster.md): resume from the last
checkpoint once the storage answers again. Workers ignore SIGTERM (train/signals.py), so torch's fallback
(terminate) cannot end them: the ones still running when the loader is left are killed here (``Watch.close``,
and at exit), so the process never waits on them.
"""
from __future__ import annotations

import atexit
import os
import re
import signal
import weakref

import numpy as np

EXIT_WORKER = 5
_PID = re.compile(r"DataLoader worker \(pid\(?s?\)? ?([\d, ]+)\)")


class WorkerFailure(RuntimeError):
    """A DataLoader worker stalled or died; the message names it, its step, bucket and shards."""


class Watch:
    """What the main process knows about its workers: their pids, the next step owed, each one's shards."""

    def __init__(self, stream, iterator, timeout_s: float):
        self.workers = list(getattr(iterator, "_workers", []))  # torch keeps them there
        _WORKERS.update(self.workers)
        self.stream, self.timeout_s = stream, timeout_s
        self.pids = [int(w.pid) for w in self.workers]
        self.iterator_id = id(iterator)  # not the iterator: holding it would keep its workers past the run
        self.next_step = getattr(stream, "start", 0)
        self.killed: dict[int, str] = {}
        global CURRENT
        CURRENT = self

    def delivered(self, step: int) -> None:
        self.next_step = step + 1

    def _owed_by(self, worker: int) -> int:
        """The first step not delivered yet that worker ``worker`` makes (worker w makes start + w + k * streams)."""
        n, start = self.stream.streams, getattr(self.stream, "start", 0)
        s = self.next_step
        return s + ((start + worker - s) % n)

    def describe(self, worker: int) -> str:
        pid = f" (pid {self.pids[worker]})" if worker < len(self.pids) else ""
        try:
            step = self._owed_by(worker)
            b = self.stream.shards.buckets[int(self.stream.bucket_of_steps(np.array([step]))[0])]
            urls = self.stream._urls_for(self.stream.shards.urls[b.name], step % self.stream.streams)
        except AttributeError:  # a dataset that is not a BatchStream: no steps to name
            return f"data worker {worker}{pid}"
        shown = ", ".join(urls[:3]) + (f" (+{len(urls) - 3} more)" if len(urls) > 3 else "")
        return f"data worker {worker}{pid}, making step {step} (bucket {b.name}; its shards: {shown})"

    def stalled(self) -> WorkerFailure:
        worker = (self.next_step - getattr(self.stream, "start", 0)) % max(1, len(self.workers))
        what = self.describe(worker)
        msg = (f"{what} produced no batch for {self.timeout_s:g} s (data.worker_timeout_s): it is stopped or blocked "
               f"(a hung read of those shards, a dead mount or object store); the run stops, resume it with "
               f"--resume once the storage answers")
        if worker < len(self.pids):
            self._kill(self.pids[worker], msg)
        return WorkerFailure(msg)

    def _forget_pids(self) -> None:
        try:  # torch must not report the deaths of workers we end as crashes of its own
            from torch.utils.data import _utils
            _utils.signal_handling._remove_worker_pids(self.iterator_id)
        except Exception:  # private API moved: a death is then explained through self.killed
            pass

    def _kill(self, pid: int, msg: str) -> None:
        self.killed[pid] = msg
        self._forget_pids()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        """End the workers still running when the loader is left (an early stop, an error): they ignore SIGTERM,
        so torch's own fallback (terminate) would leave one that waits on a full queue or a ring slot running,
        and the process would wait on it forever at exit. Killed: their batches are not wanted any more."""
        alive = [w for w in self.workers if w.is_alive()]
        if alive:
            self._forget_pids()
            _kill_all(alive)

    def died(self, error: BaseException) -> WorkerFailure | None:
        m = _PID.search(str(error))
        if m is None:
            return None
        pids = [int(p) for p in re.findall(r"\d+", m.group(1))]
        for pid in pids:
            if pid in self.killed:
                return WorkerFailure(self.killed[pid])
        worker = next((self.pids.index(p) for p in pids if p in self.pids), None)
        text = str(error)
        sig, code = re.search(r"killed by signal: ([^.]+)", text), re.search(r"exit code (-?\d+)", text)
        how = f"killed by signal: {sig.group(1)}" if sig else f"exit code {code.group(1)}" if code else "exited"
        what = self.describe(worker) if worker is not None else f"data worker pid {pids[0]}"
        return WorkerFailure(f"{what} died ({how}); the run stops, resume it with --resume (the OOM killer, a "
                             f"crash in a decoder, a node losing memory: see the system log)")


CURRENT: Watch | None = None
_WORKERS: "weakref.WeakSet" = weakref.WeakSet()  # every DataLoader worker process a Watch saw, while referenced


def _kill_all(workers) -> None:
    for w in workers:
        try:
            os.kill(w.pid, signal.SIGKILL)
        except (OSError, TypeError):
            pass
    for w in workers:
        try:
            w.join(5.0)
        except (AssertionError, ValueError, OSError):  # not our child (a forked copy of this module)
            pass


@atexit.register  # registered after torch's own exit hook, so it runs first
def _end_workers() -> None:
    """multiprocessing's exit terminates daemonic children, then joins them: a worker that ignores SIGTERM and is
    still running would make it wait forever. Kill what is left."""
    _kill_all([w for w in list(_WORKERS) if _is_alive(w)])


def _is_alive(w) -> bool:
    try:
        return w.is_alive()
    except (AssertionError, ValueError):  # is_alive of another process's child
        return False


def is_timeout(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and "DataLoader timed out after" in str(error)


_PEER = re.compile(r"Connection closed by peer|Connection reset by peer|gloo/transport|NCCL")


def peer_failure(error: BaseException) -> WorkerFailure | None:
    """Another rank died or hung (its collective fails here: gloo 'Connection closed by peer', an NCCL abort or
    watchdog timeout): the same exit 5, one line."""
    import torch.distributed as dist
    if not (isinstance(error, getattr(dist, "DistError", ())) or _PEER.search(str(error))):
        return None
    first = next((ln.strip() for ln in str(error).splitlines() if ln.strip()), type(error).__name__)
    first = re.sub(r"^\[[^\]]*\] ", "", first)[:300]  # gloo prefixes its source file and line
    return WorkerFailure(f"a peer rank failed ({first}); the run stops on every rank: see the first failing rank's "
                         f"log, then resume with --resume")


def explain(error: BaseException) -> WorkerFailure | None:
    """The one-line WorkerFailure for a torch DataLoader error about a worker (stall or death) or for a failed
    peer rank, else None."""
    if isinstance(error, WorkerFailure):
        return error
    if not isinstance(error, RuntimeError):
        return None
    if CURRENT is not None:
        if is_timeout(error):
            return CURRENT.stalled()
        died = CURRENT.died(error)
        if died is not None:
            return died
    return peer_failure(error)
