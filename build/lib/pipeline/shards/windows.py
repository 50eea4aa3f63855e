"""Frame windows: the decoded frames of one encode call, never more than a byte budget.

A (scene, resolution) used to travel as one object holding every frame of the scene
(240 x 6 x 848 x 1600 x 3 B = 5.9 GB for a 20 s scene at full width, growing with the
scene). Now each encode call gets its own window: the distinct frames of the units it
encodes, decoded by one frames task into one object of at most ``budget`` bytes.

Planning, per (scene, H, W) in unit order (units sorted by start, so neighbours share frames):
- whole units are packed into a call while the union of their frames fits the budget and
  the call has fewer than ``units_per_call`` units;
- a unit that does not fit alone is split by views: each call encodes views [v0, v1) of
  it, v1 - v0 = budget // (T x frame bytes). The writer joins the parts along V. The
  VAE encodes every view on its own (diffusers' slicing, batch of one), so the latents
  are bit-identical to encoding all views at once;
- a single view of one unit above the budget is a configuration error (said at plan time):
  the causal encoder needs all T frames of a view in one call.

Frames shared by units in different calls are decoded once per call (the cost is the
overlap at call boundaries; ``window_stats`` reports it).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EncodeCall:
    """One encode actor call: units (all or some views of each) and the frames it needs."""
    group: tuple                          # (scene_name, H, W)
    units: list                           # [pipeline.shards.encode.EncodeUnit]
    views: tuple[int, int] | None = None  # [v0, v1) of every unit; None = all views
    paths: list[str] = field(default_factory=list)  # distinct frame paths, sorted

    def window_bytes(self) -> int:
        return len(self.paths) * frame_bytes(self.group[1], self.group[2])


def frame_bytes(height: int, width: int) -> int:
    return height * width * 3  # one uint8 RGB frame


def _paths(units: list, views: tuple[int, int] | None) -> set[str]:
    sl = slice(*views) if views else slice(None)
    return {p for u in units for row in u.frames for p in row[sl]}


def plan_calls(units: dict[tuple, list], budget_bytes: int, units_per_call: int) -> list[EncodeCall]:
    """{(scene, H, W): [EncodeUnit]} -> encode calls whose frame windows each fit ``budget_bytes``."""
    if units_per_call < 1:
        raise ValueError(f"units_per_call must be >= 1, got {units_per_call}")
    calls: list[EncodeCall] = []
    for group, us in sorted(units.items()):
        fb = frame_bytes(group[1], group[2])
        cur: list = []
        cur_paths: set[str] = set()

        def flush():
            if cur:
                calls.append(EncodeCall(group, list(cur), None, sorted(cur_paths)))
                cur.clear()
                cur_paths.clear()

        for u in us:
            own = _paths([u], None)
            if len(own) * fb > budget_bytes:  # too big alone: split by views
                flush()
                calls.extend(_split_by_views(group, u, fb, budget_bytes))
                continue
            if cur and (len(cur) >= units_per_call or len(cur_paths | own) * fb > budget_bytes):
                flush()
            cur.append(u)
            cur_paths |= own
        flush()
    return calls


def _split_by_views(group: tuple, unit, fb: int, budget_bytes: int) -> list[EncodeCall]:
    t, v = len(unit.frames), len(unit.frames[0])
    per_view = len(_paths([unit], (0, 1))) * fb
    step = budget_bytes // per_view if per_view else v
    if step < 1:
        raise ValueError(f"frame budget {budget_bytes / 1e6:g} MB is below one view of clip {unit.uid} "
                         f"({t} frames x {group[1]}x{group[2]} x 3 B = {per_view / 1e6:g} MB): the encoder needs a "
                         "view's frames in one call; raise --frame-budget-mb")
    return [EncodeCall(group, [unit], (v0, min(v, v0 + step)), sorted(_paths([unit], (v0, min(v, v0 + step)))))
            for v0 in range(0, v, step)]


def window_stats(calls: list[EncodeCall]) -> dict:
    """Peak window bytes and decode work against the distinct frames (the price of windows)."""
    decoded = sum(len(c.paths) for c in calls)
    distinct = len({(c.group, p) for c in calls for p in c.paths})
    return {"calls": len(calls), "peak_window_bytes": max((c.window_bytes() for c in calls), default=0),
            "frames_decoded": decoded, "frames_distinct": distinct}


def merge_parts(parts: list[dict]) -> dict:
    """Join the results of the view parts of one unit ({"mean", "std", "bad_frames", "views"}) along V."""
    import numpy as np
    if len(parts) == 1:
        return parts[0]
    parts = sorted(parts, key=lambda r: r["views"][0])
    for a, b in zip(parts, parts[1:]):
        if a["views"][1] != b["views"][0]:
            raise ValueError(f"view parts {[r['views'] for r in parts]} do not tile the views")
    bad: dict = {}
    for r in parts:
        bad.update(r["bad_frames"])
    return {"mean": np.concatenate([r["mean"] for r in parts]), "std": np.concatenate([r["std"] for r in parts]),
            "bad_frames": bad, "views": (parts[0]["views"][0], parts[-1]["views"][1]),
            "seconds": sum(r.get("seconds", 0.0) for r in parts), "frames": sum(r.get("frames", 0) for r in parts)}
