"""Features of clips: frames read by worker threads, prepared by the protocol, batched through the network.

A *unit* is one view of one clip (generated: one generation of it). FVD gives each unit one
vector (the I3D's 400 logits of its first 16 frames); FID gives one vector per scored frame (the
InceptionV3's 2048 pool features). JPEG/PNG decoding and the PIL resize release the GIL, so
threads keep the network fed; the network runs in the calling thread in batches of ``batch``
clips (FVD) or frames (FID).
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from train.eval.protocol import Protocol, i3d_input, prepare

METRICS = ("fvd", "fid")


@dataclass(frozen=True)
class Unit:
    """One view of one clip: ``ref`` identifies it to the caller (e.g. (key, generation, view))."""
    ref: tuple
    indices: tuple[int, ...]    # the frames scored


@dataclass
class Extractor:
    metric: str                 # "fvd" | "fid"
    model: torch.nn.Module
    protocol: Protocol
    device: str = "cpu"
    batch: int = 8

    def inputs(self, frames: np.ndarray) -> torch.Tensor:
        """(N, H, W, 3) uint8 frames of one unit -> the network's input for it."""
        if self.metric == "fvd":
            return i3d_input(frames, self.protocol)[None]        # (1, 3, T, R, R)
        return prepare(frames, self.protocol)                     # (N, 3, h, w)

    @torch.no_grad()
    def run(self, x: torch.Tensor) -> np.ndarray:
        out = []
        for i in range(0, x.shape[0], self.batch):
            out.append(self.model(x[i:i + self.batch].to(self.device)).float().cpu())
        return torch.cat(out).numpy().astype(np.float64)         # (N, D)


def _ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """fn over items in order, at most 2 * workers in flight (bounded memory)."""
    items = iter(items)
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        window: deque = deque()
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= 2 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def extract(units: list[Unit], load: Callable[[Unit], np.ndarray], fx: Extractor, workers: int = 1,
            desc: str = "features", progress: bool = True) -> dict[tuple, np.ndarray]:
    """ref -> (1, D) (FVD) or (N, D) (FID) features of each unit, in float64."""
    out: dict[tuple, np.ndarray] = {}
    pending: list[tuple[tuple, torch.Tensor]] = []
    per_batch = fx.batch if fx.metric == "fvd" else 1            # FID units are already batches of frames

    def flush():
        x = torch.cat([t for _, t in pending])
        feats = fx.run(x)
        start = 0
        for ref, t in pending:
            out[ref] = feats[start:start + t.shape[0]]
            start += t.shape[0]
        pending.clear()

    prepared = _ordered_map(lambda u: (u.ref, fx.inputs(load(u))), units, workers)
    for ref, x in tqdm(prepared, total=len(units), desc=desc, unit="clip-view", disable=not progress,
                       dynamic_ncols=True):
        pending.append((ref, x))
        if len(pending) >= per_batch:
            flush()
    if pending:
        flush()
    return out
