"""A DataLoader worker that stops producing, or dies, ends the run with one line naming it: exit 5.

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
checkpoint once the storage answers again. Workers ignore SIGTERM (train/signals.py); at exit the ones an
error left running are shut down here, so the process never waits on them.
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
        self.stream, self.timeout_s = stream, timeout_s
        self.pids = [int(w.pid) for w in getattr(iterator, "_workers", [])]  # torch keeps them there
        self.iterator_id = id(iterator)  # not the iterator: holding it would keep its workers past the run
        _LIVE.add(iterator)
        self.next_step = stream.start
        self.killed: dict[int, str] = {}
        global CURRENT
        CURRENT = self

    def delivered(self, step: int) -> None:
        self.next_step = step + 1

    def _owed_by(self, worker: int) -> int:
        """The first step not delivered yet that worker ``worker`` makes (worker w makes start + w + k * streams)."""
        n, start = self.stream.streams, self.stream.start
        s = self.next_step
        return s + ((start + worker - s) % n)

    def describe(self, worker: int) -> str:
        step = self._owed_by(worker)
        b = self.stream.shards.buckets[int(self.stream.bucket_of_steps(np.array([step]))[0])]
        urls = self.stream._urls_for(self.stream.shards.urls[b.name], step % self.stream.streams)
        shown = ", ".join(urls[:3]) + (f" (+{len(urls) - 3} more)" if len(urls) > 3 else "")
        pid = f" (pid {self.pids[worker]})" if worker < len(self.pids) else ""
        return f"data worker {worker}{pid}, making step {step} (bucket {b.name}; its shards: {shown})"

    def stalled(self) -> WorkerFailure:
        worker = (self.next_step - self.stream.start) % self.stream.streams
        what = self.describe(worker)
        msg = (f"{what} produced no batch for {self.timeout_s:g} s (data.worker_timeout_s): it is stopped or blocked "
               f"(a hung read of those shards, a dead mount or object store); the run stops, resume it with "
               f"--resume once the storage answers")
        if worker < len(self.pids):
            self._kill(self.pids[worker], msg)
        return WorkerFailure(msg)

    def _kill(self, pid: int, msg: str) -> None:
        self.killed[pid] = msg
        try:  # torch must not report this death as a crash of its own: it is ours
            from torch.utils.data import _utils
            _utils.signal_handling._remove_worker_pids(self.iterator_id)
        except Exception:  # private API moved: the death is then explained through self.killed
            pass
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

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
_LIVE: "weakref.WeakSet" = weakref.WeakSet()  # DataLoader iterators with workers, while they live


@atexit.register  # registered after torch's own exit hook, so it runs first, while torch can still shut down
def _end_workers() -> None:
    """Workers ignore SIGTERM (train/signals.py), so multiprocessing's exit (terminate, then join) would wait
    forever on one an error left running: shut the workers of every live iterator down, then kill the rest."""
    for it in list(_LIVE):
        try:
            it._shutdown_workers()
        except Exception:  # private API, or a worker already gone: the kill below is enough
            pass
        for w in getattr(it, "_workers", []):
            try:
                if w.is_alive():
                    os.kill(w.pid, signal.SIGKILL)
                    w.join(1.0)
            except (OSError, AssertionError, ValueError):
                pass


def is_timeout(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and "DataLoader timed out after" in str(error)


def explain(error: BaseException) -> WorkerFailure | None:
    """The one-line WorkerFailure for a torch DataLoader error about a worker (stall or death), else None."""
    if isinstance(error, WorkerFailure):
        return error
    if CURRENT is None or not isinstance(error, RuntimeError):
        return None
    if is_timeout(error):
        return CURRENT.stalled()
    return CURRENT.died(error)
