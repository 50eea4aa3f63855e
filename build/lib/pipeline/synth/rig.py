"""Sensor timestamps of the synthetic writer: the lidar-triggered nuScenes rig (default) or the old regular one.

nuScenes (nuscenes-devkit issues #1004, #1025, #1100): the 20 Hz LIDAR_TOP triggers each camera as it
sweeps past it, 12 camera rounds per 20 sweeps, so consecutive rounds are 1 or 2 sweeps (50 or 100 ms)
apart (synth_world.TRIGGER_SWEEPS); in a round CAM_FRONT fires LIDAR_OFFSET_US before the sweep's
timestamp and every other camera at its CAMERA_RIG offset. Under load the logger drops images, each
camera on its own. Everything here draws from the scene's generator in a fixed order (determinism).
"""
from __future__ import annotations

import numpy as np

from pipeline.contract import schema
from pipeline.synth.world import (CAMERA_PERIOD_US, CAMERA_RIG, FRAME_JITTER_US, LIDAR_OFFSET_US, LIDAR_PERIOD_US,
                                  ROUND_JITTER_US, trigger_rounds)


def lidar_triggered_times(rng: np.random.Generator, num_frames: int, t0: int,
                          keyframes: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({channel: (F,) or (sweeps,) timestamps [us]}, (K,) keyframe lidar timestamps) of the nuScenes rig."""
    sweep = trigger_rounds(rng, num_frames)                                          # (F,) sweep of each round
    lidar = t0 + LIDAR_OFFSET_US + np.arange(sweep[-1] + 1) * LIDAR_PERIOD_US
    lidar = lidar + rng.integers(-ROUND_JITTER_US, ROUND_JITTER_US + 1, len(lidar))
    times = {}
    for ch in schema.VIEWS:
        jitter = rng.integers(-ROUND_JITTER_US, ROUND_JITTER_US + 1, num_frames)
        times[ch] = lidar[sweep] - LIDAR_OFFSET_US + CAMERA_RIG[ch][5] + jitter
    times[schema.LIDAR_CHANNEL] = lidar.astype(np.int64)
    return times, lidar[sweep[keyframes]]


def regular_times(rng: np.random.Generator, num_frames: int, t0: int,
                  keyframes: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The old regular rig: cameras every 83.3 ms +- 1.5 ms with their offsets, keyframe lidar 35.5 ms after
    CAM_FRONT's keyframe, ~20 Hz lidar sweeps evenly in between."""
    f = np.arange(num_frames)
    times = {}
    for ch in schema.VIEWS:
        jitter = rng.integers(-FRAME_JITTER_US, FRAME_JITTER_US + 1, num_frames)
        times[ch] = t0 + np.round(f * CAMERA_PERIOD_US).astype(np.int64) + CAMERA_RIG[ch][5] + jitter
    key = times["CAM_FRONT"][keyframes] + LIDAR_OFFSET_US + rng.integers(-500, 501, len(keyframes))
    lidar = [key[0]]
    for a, b in zip(key[:-1], key[1:]):
        n = max(1, int(round((b - a) / LIDAR_PERIOD_US)))
        lidar += [int(a + (b - a) * j / n) for j in range(1, n)] + [b]
    times[schema.LIDAR_CHANNEL] = np.asarray(lidar, np.int64)
    return times, key


BURST_LENGTHS = (2, 3)        # burst mode: a drop event loses this many consecutive images of one camera
BURST3_SHARE = 0.05           # ... 3 with this probability, else 2 (docs/synth.md: what 3-runs cost long clips)


def _burst_drops(rng: np.random.Generator, cand: np.ndarray, k: int, burst3_share: float) -> np.ndarray:
    """About ``k`` dropped frames of ``cand`` (sorted candidate frames) in runs of 2-3 consecutive candidates:
    events are placed one by one at random free starts whose whole run is candidate, consecutive and not
    touching another event (so every run has exactly its drawn length)."""
    drop = np.zeros(int(cand.max()) + 2 if len(cand) else 1, bool)
    ok = np.zeros_like(drop)
    ok[cand] = True
    total, tries = 0, 0
    while total < k and tries < 50 * max(k, 1):
        tries += 1
        n = BURST_LENGTHS[1] if rng.random() < burst3_share else BURST_LENGTHS[0]
        n = min(n, max(BURST_LENGTHS[0], k + 1 - total))   # at most one image beyond k
        a = int(rng.choice(cand))
        lo, hi = max(a - 1, 0), min(a + n + 1, len(drop))
        if a + n > len(drop) or not ok[a:a + n].all() or drop[lo:hi].any():
            continue
        drop[a:a + n] = True
        total += n
    return np.flatnonzero(drop)


def dropped_images(rng: np.random.Generator, num_frames: int, keyframes: np.ndarray, rate: float,
                   bursts: bool = False, burst3_share: float = BURST3_SHARE,
                   explicit: dict[str, list[int]] | None = None) -> dict[str, np.ndarray]:
    """Per camera, independently: (F,) True where the image was not recorded (never a keyframe, nor the
    first or last frame); round(rate x candidates) images per camera, one by one or (``bursts``) in runs of
    2-3 consecutive images (``_burst_drops``); plus the ``explicit`` {channel: [frame, ...]} drops."""
    out = {}
    cand = np.setdiff1d(np.arange(1, num_frames - 1), keyframes)
    for ch in schema.VIEWS:
        drop = np.zeros(num_frames, bool)
        k = int(round(rate * len(cand)))
        if k and bursts:
            drop[_burst_drops(rng, cand, k, burst3_share)] = True
        elif k:
            drop[rng.choice(cand, k, replace=False)] = True
        for f in (explicit or {}).get(ch, ()):
            if f not in cand:
                raise ValueError(f"explicit drop {ch} frame {f}: only non-keyframes inside the scene can be dropped "
                                 f"(keyframes {keyframes.tolist()}, frames 1..{num_frames - 2})")
            drop[f] = True
        out[ch] = drop
    return out
