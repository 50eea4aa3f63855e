"""Per-view statistics of the schema-2.0 time model, for ``mdv2-stats`` (pipeline/tools/stats.py).

Each camera fires at its own time, so a shard carries one box per view (``view_boxes``,
(T, V, N, 7), at view v's exposure) next to the reference ``boxes`` ((T, N, 7), at
CAM_FRONT's exposure), and the exposure times ``meta["view_timestamps_us"]`` (T x V). Per view
this reports what a data engineer checks the time model with:

- visible box-frames: (frame, object) pairs with ``box_view_mask`` set, and their mean per frame;
- exposure offset: ``view_timestamps_us[t][v] - timestamps_us[t]`` in ms (``timestamps_us`` is
  CAM_FRONT's exposure, so CAM_FRONT's own row must read 0 and the others the rig's shutter
  offsets, about -8 to +35 ms on nuScenes): median, min, max;
- displacement: centre distance between ``view_boxes[t, v, n]`` and ``boxes[t, n]`` for present
  objects (``box_mask``), in metres: median, p95, max. Parked objects give 0; a car at 15 m/s
  moves 0.5 m in 35 ms.

Memory stays bounded whatever the dataset size: offsets are counted per exact microsecond,
displacements in 1 mm bins up to 20 m (beyond that, the last bin; the max stays exact).
Quantiles are nearest-rank (numpy's ``inverted_cdf``): always a value that occurred.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from pipeline.contract import schema

DISPLACEMENT_BIN_M = 0.001
DISPLACEMENT_BINS = 20_001          # 0 .. 20 m in 1 mm bins; the last one also holds everything beyond


def nearest_rank(values: np.ndarray, counts: np.ndarray, q: float) -> float:
    """The q-quantile (nearest rank, numpy 'inverted_cdf') of sorted `values` seen `counts` times each."""
    cum = np.cumsum(counts)
    return float(values[int(np.searchsorted(cum, q * cum[-1], side="left"))])


@dataclass
class _View:
    frames: int = 0
    visible: int = 0
    offsets_us: Counter = field(default_factory=Counter)                 # offset (µs) -> frames
    displacement: np.ndarray = field(default_factory=lambda: np.zeros(DISPLACEMENT_BINS, np.int64))
    displacement_max: float = 0.0

    def to_json(self) -> dict:
        out: dict = {"frames": self.frames, "visible_box_frames": self.visible,
                     "visible_per_frame": round(self.visible / self.frames, 3) if self.frames else 0.0}
        if self.offsets_us:
            vals = np.array(sorted(self.offsets_us), np.int64)
            cnts = np.array([self.offsets_us[v] for v in vals], np.int64)
            out["exposure_offset_ms"] = {"median": nearest_rank(vals, cnts, 0.5) / 1e3,
                                         "min": float(vals[0]) / 1e3, "max": float(vals[-1]) / 1e3}
        n = int(self.displacement.sum())
        if n:
            bins = np.nonzero(self.displacement)[0]
            cnts = self.displacement[bins]
            out["displacement_m"] = {"objects": n,
                                     "median": round(nearest_rank(bins, cnts, 0.5) * DISPLACEMENT_BIN_M, 3),
                                     "p95": round(nearest_rank(bins, cnts, 0.95) * DISPLACEMENT_BIN_M, 3),
                                     "max": round(self.displacement_max, 3)}
        return out


@dataclass
class ViewStats:
    views: dict[str, _View] = field(default_factory=dict)   # by view name, in order of first appearance
    samples: int = 0

    def add(self, meta: dict, members: dict[str, bytes], box_mask: np.ndarray, key: str) -> None:
        """One sample; box_mask is its (T, N) bool ``box_mask``."""
        names = list(meta["views"])
        t, n, v = box_mask.shape[0], box_mask.shape[1], len(names)
        for member in ("box_view_mask.npy", "view_boxes.npy", "boxes.npy"):
            if member not in members:
                raise schema.SchemaError(member, f"missing (schema {meta.get('schema_version')}); this mdv2-stats "
                                                 f"reads schema {schema.SCHEMA_VERSION}: rebuild the shards", key)
        view_mask = schema.npy_load(members["box_view_mask.npy"], "box_view_mask.npy", key)   # (T, V, N) bool
        view_boxes = schema.npy_load(members["view_boxes.npy"], "view_boxes.npy", key)        # (T, V, N, 7)
        boxes = schema.npy_load(members["boxes.npy"], "boxes.npy", key)                       # (T, N, 7)
        for member, arr, shape in (("box_view_mask.npy", view_mask, (t, v, n)),
                                   ("view_boxes.npy", view_boxes, (t, v, n, 7)), ("boxes.npy", boxes, (t, n, 7))):
            if arr.shape != shape:
                raise schema.SchemaError(member, f"shape {arr.shape}, expected {shape} from box_mask and views", key)
        stamps = np.asarray(meta["view_timestamps_us"], np.int64)                        # (T, V)
        ref = np.asarray(meta["timestamps_us"], np.int64)                                # (T,) CAM_FRONT
        offsets = stamps - ref[:, None]                                                  # (T, V) µs
        dist = np.linalg.norm(view_boxes[..., :3].astype(np.float64)
                              - boxes[:, None, :, :3].astype(np.float64), axis=-1)       # (T, V, N) m
        self.samples += 1
        for j, name in enumerate(names):
            s = self.views.setdefault(name, _View())
            s.frames += t
            s.visible += int(view_mask[:, j].sum())
            s.offsets_us.update(int(x) for x in offsets[:, j])
            d = dist[:, j][box_mask]                                                     # present objects
            if d.size:
                bins = np.minimum(np.rint(d / DISPLACEMENT_BIN_M).astype(np.int64), DISPLACEMENT_BINS - 1)
                s.displacement += np.bincount(bins, minlength=DISPLACEMENT_BINS)
                s.displacement_max = max(s.displacement_max, float(d.max()))

    def to_json(self) -> dict:
        return {"samples": self.samples, "order": list(self.views),
                "per_view": {name: s.to_json() for name, s in self.views.items()}}

    def markdown(self) -> list[str]:
        j = self.to_json()["per_view"]
        lines = ["## Views (schema 2.0 time model)", "",
                 "Exposure offset: the view's exposure minus CAM_FRONT's (the frame time), in ms. Displacement: "
                 "centre distance of `view_boxes` from the reference `boxes` for present objects, in m.", "",
                 "| view | visible box-frames | per frame | offset median | offset min | offset max | "
                 "displacement median | p95 | max |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, s in j.items():
            o = s.get("exposure_offset_ms", {})
            d = s.get("displacement_m", {})
            lines.append(f"| {name} | {s['visible_box_frames']} | {s['visible_per_frame']} | "
                         f"{o.get('median', '-')} | {o.get('min', '-')} | {o.get('max', '-')} | "
                         f"{d.get('median', '-')} | {d.get('p95', '-')} | {d.get('max', '-')} |")
        return lines
