"""Hand batches from DataLoader workers to the trainer through reused shared memory.

torch's default hand-over allocates a new shared-memory segment per batch in the worker (every page is
faulted in and zeroed: 3.2 ms for 4 MB against 0.15 ms for reused memory) and passes its file
descriptor over a socket, with an authentication handshake per batch that a Python thread of the
busy worker must serve. With two workers that made the loader 0.3x as fast as one process
(bench/loader.py ``workers_vs_one_process``).

Here each worker owns a ring of slots in anonymous shared memory, mapped before the workers fork. A
worker claims a free slot, collates the batch into it (train/batch.py, the same layout as anywhere
else) and sends only a small ``RingBatch`` (the slot and the tensor layout). The trainer's process copies
the slot out in one memcpy (straight into pinned memory when the DataLoader pins) and frees the slot.
The copy makes the batch the trainer's own: keeping batches around never races the workers.

A semaphore per slot is the free flag: sem_post/sem_wait order the memory between the processes on
any CPU. A batch larger than a slot, or no free slot, goes the default way (never a wait); so does
everything off Linux (the workers must be forked to inherit the ring; on Linux the Loader forks them).
"""
from __future__ import annotations

import itertools
import mmap
import multiprocessing
import sys
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from train.batch import Batch

_RINGS: dict[int, "BatchRing"] = {}  # in the trainer's process: the rings its RingBatches point into
_IDS = itertools.count()


class BatchRing:
    def __init__(self, workers: int, slots: int, slot_bytes: int):
        self.id, self.slots, self.slot_bytes = next(_IDS), slots, slot_bytes
        ctx = multiprocessing.get_context("fork")
        self.mem = [mmap.mmap(-1, slots * slot_bytes) for _ in range(workers)]  # MAP_SHARED: survives fork
        self.free = [[ctx.Semaphore(1) for _ in range(slots)] for _ in range(workers)]
        self._next = 0  # the worker's round-robin start (each worker has its own copy after the fork)
        _RINGS[self.id] = self

    @staticmethod
    def usable() -> bool:
        """Workers inherit the ring only when they are forked: Linux, where the Loader asks for fork."""
        return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()

    # ---- in a worker ------------------------------------------------------------------------------
    def claim(self, worker: int, nbytes: int) -> int | None:
        """A free slot of this worker that holds ``nbytes``, now marked busy; None: use the default way."""
        if nbytes > self.slot_bytes:
            return None
        for k in range(self.slots):
            slot = (self._next + k) % self.slots
            if self.free[worker][slot].acquire(block=False):
                self._next = slot + 1
                return slot
        return None

    def storage(self, worker: int, slot: int) -> torch.UntypedStorage:
        """The slot's memory as a torch storage (no copy)."""
        start = slot * self.slot_bytes
        return torch.frombuffer(self.mem[worker], dtype=torch.uint8, count=self.slot_bytes,
                                offset=start).untyped_storage()

    # ---- in the trainer's process --------------------------------------------------------------------
    def take(self, rb: "RingBatch", pin: bool = False) -> Batch:
        """Copy the slot out (one memcpy into one allocation), free it, and rebuild the Batch around the copy."""
        start = rb.slot * self.slot_bytes
        src = np.frombuffer(self.mem[rb.worker], np.uint8, count=rb.nbytes, offset=start)
        own = torch.empty(max(rb.nbytes, 1), dtype=torch.uint8, pin_memory=pin)
        own.numpy()[:rb.nbytes] = src
        self.free[rb.worker][rb.slot].release()
        storage = own.untyped_storage()
        tensors = {name: torch.empty(0, dtype=dtype).set_(storage, offset // dtype.itemsize, shape)
                   for name, (offset, shape, dtype) in rb.layout.items()}
        return replace(rb.batch, **tensors)

    def close(self) -> None:
        _RINGS.pop(self.id, None)
        for m in self.mem:
            try:
                m.close()
            except BufferError:  # a batch view still exported (an exception mid-copy): the GC unmaps it later
                pass


@dataclass
class RingBatch:
    """What a worker sends for a batch collated into a ring slot: the batch without its tensors, and where
    each tensor lies in the slot. ``Batch`` comes back through ``unpack`` (or ``pin_memory``)."""
    ring: int
    worker: int
    slot: int
    nbytes: int
    layout: dict[str, tuple[int, tuple[int, ...], torch.dtype]]  # name -> (byte offset, shape, dtype)
    batch: Batch                                                 # tensor fields are None

    def unpack(self, pin: bool = False) -> Batch:
        return _RINGS[self.ring].take(self, pin)

    def pin_memory(self) -> Batch:
        """The DataLoader's pin-memory thread: the copy out of the slot goes straight to pinned memory."""
        return self.unpack(pin=True)


def ring_batch(ring: BatchRing, worker: int, slot: int, batch: Batch) -> RingBatch:
    """Wrap a batch whose tensors are views of ``slot`` for the trip to the trainer's process."""
    base = ring.storage(worker, slot).data_ptr()
    layout, stripped, end = {}, {}, 0
    for f in fields(batch):
        t = getattr(batch, f.name)
        if isinstance(t, torch.Tensor):
            offset = t.data_ptr() - base
            layout[f.name] = (offset, tuple(t.shape), t.dtype)
            end = max(end, offset + t.numel() * t.element_size())
            stripped[f.name] = None
    return RingBatch(ring.id, worker, slot, end, layout, replace(batch, **stripped))
