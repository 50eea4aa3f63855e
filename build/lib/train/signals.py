"""Stop on SIGTERM/SIGINT the way schedulers expect: finish the step, write a checkpoint, exit 4.

SLURM preemption, Kubernetes eviction and spot reclaim send SIGTERM and wait a grace period
before SIGKILL. The trainer's handler only sets a flag; the loop finishes the step it is in,
writes a checkpoint through its usual save path and leaves with ``EXIT_STOPPED`` (4), so a
rerun with ``--resume`` continues exactly (docs/cluster.md). A second Ctrl-C stops at once.

Under ``torchrun`` the signal may reach one rank first (or only one): every rank all-reduces the
flag once per step (MAX of one number: a few microseconds next to a step), so all ranks stop after
the same step and save the same checkpoint. DataLoader workers ignore both signals
(:func:`ignore_in_worker`): a worker killed by the scheduler's SIGTERM would make the DataLoader
raise in the middle of the step that is meant to finish; the main process ends them itself.
"""
from __future__ import annotations

import signal
import sys
import threading

import torch
import torch.distributed as dist

EXIT_STOPPED = 4
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    """A stop flag set by SIGTERM/SIGINT; :meth:`agreed` is the same on every rank."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():  # signal.signal works there only
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def release(self, world: int) -> None:
        """At the end of the command: one process gives the handlers back (in-process callers, tests); a rank of
        a multi-process run ignores the signals from here on, because the launcher sends SIGTERM to the ranks still
        exiting when the first one ends, and Python's exit resets a handler to the default (killed: -15) but
        keeps an ignore."""
        if world <= 1:
            self.restore()
        elif threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                signal.signal(s, signal.SIG_IGN)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:  # a second Ctrl-C: the user means it
            raise KeyboardInterrupt
        if self.signum is None:
            print(f"train: got {signal.Signals(signum).name}: finishing this step, then a checkpoint and exit "
                  f"{EXIT_STOPPED} (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
        self.signum = signum

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def agreed(self, device: torch.device, world: int) -> bool:
        """True on every rank once any rank got a signal (a collective under torchrun: call it on every rank)."""
        if world <= 1 or not dist.is_initialized():
            return self.signum is not None
        flag = torch.tensor([0.0 if self.signum is None else 1.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and self.signum is None:
            self.signum = signal.SIGTERM  # another rank's signal
        return flag.item() > 0


def ignore_in_worker(worker_id: int | None = None) -> None:
    """DataLoader worker_init_fn: the main process decides when the workers end."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
