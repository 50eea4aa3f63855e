"""Which clips a scene's repaired frames allow, and the yield of every bucket: possible, kept, repaired, lost.

A view's dropped image is repaired in the scene store (pipeline/scenes/rounds.py: the nearest image of the
same camera, at that image's exposure). A clip may hold repaired view-frames; it is lost only when
- one of its views misses more than ``max_fill_run`` consecutive images (``fill_run``; a run is counted over
  the camera's whole stream, so every repaired image of a kept clip comes from an adjacent round, at most
  ``max_fill_run`` // 2 + 1 rounds away -- the default 2 keeps every fill one round away), or the camera has
  no image at all;
- it would span a ``gap``: a round no camera recorded (nothing to repair from);
- its images are too small for the bucket (``image_too_small``, a config matter).
A video clip the rules reject moves past what blocks it when the scene has room (``SceneRules.place``): the
later clips keep their stride from there, so the bucket loses a clip only when the scene runs out of frames.

``SceneRules`` holds one scene's verdicts; ``YieldReport`` tallies them per bucket for mdv2-plan, the
build's summary and the dataset card ("possible" = the clips the scenes' lengths allow: every start of
``clip_starts``, keyframes for images, one "full" clip per scene of at least 9 frames).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from pipeline.scenes.rounds import missing_runs

MAX_FILL_RUN = 2       # default: a view may miss up to 2 consecutive images in a clip
LOW_YIELD = 0.10       # warn when a bucket keeps less than this share of its possible clips


class SceneRules:
    """One scene's unusable view-frames (runs too long to repair), filled view-frames and gaps."""

    def __init__(self, sc, max_fill_run: int = MAX_FILL_RUN):
        self.views = list(sc.views)
        recorded = np.asarray(sc.frame_ok, bool)                                  # (F, V)
        fill_from = np.asarray(getattr(sc, "fill_from", np.where(recorded, 0, -1)))
        self.filled = ~recorded & (fill_from >= 0)                                # (F, V) repaired
        self.gap = np.asarray(getattr(sc, "gap", np.zeros(len(recorded), bool)), bool)   # (F,)
        self.max_fill_run = int(max_fill_run)
        self.runs = [r for r in missing_runs(recorded) if r[2] > self.max_fill_run
                     or (fill_from[r[1]:r[1] + r[2], r[0]] < 0).any()]          # (view, first, length)
        self.no_image = {r for r in self.runs if (fill_from[r[1]:r[1] + r[2], r[0]] < 0).any()}
        self.bad = np.zeros(len(recorded), bool)                                  # (F,) frame in a long run
        for _, a, n in self.runs:
            self.bad[a:a + n] = True

    def verdict(self, s: int, t: int) -> tuple[str, str] | None:
        """None if the clip of frames [s, s + t) is usable, else (reason, detail naming the frames)."""
        holes = np.flatnonzero(self.gap[s + 1:s + t]) + s + 1
        if holes.size:
            return "gap", "; ".join(f"no camera recorded the round before frame {g}" for g in holes)
        runs = [r for r in self.runs if r[1] < s + t and r[1] + r[2] > s]
        if runs:
            return "fill_run", "; ".join(
                f"{self.views[j]} misses frames {a}-{a + n - 1} " + ("(no image of this camera to repair them from)"
                                                                     if (j, a, n) in self.no_image else
                                                                     f"({n} consecutive > max_fill_run "
                                                                     f"{self.max_fill_run})") for j, a, n in runs)
        return None

    def _past(self, s: int, t: int) -> int:
        """The first start after s whose clip holds none of what blocks [s, s + t): past the runs, at the gaps."""
        ends = [a + n for _, a, n in self.runs if a < s + t and a + n > s]
        ends += [int(g) for g in np.flatnonzero(self.gap[s + 1:s + t]) + s + 1]
        return max(ends)

    def place(self, num_frames: int, t: int, stride: int) -> tuple[list[int], list[tuple[int, str, str]]]:
        """Starts of the T-frame clips of a scene, every ``stride`` frames from 0 (clip_starts) except that a clip
        the rules reject moves past what blocks it (the next clips keep the stride from there), so a run or a gap
        costs a clip only when the scene has no room left. Returns (starts, rejected [(start, reason, detail)])."""
        starts, rejected, s = [], [], 0
        while s + t <= num_frames:
            why = self.verdict(s, t)
            if why is None:
                starts.append(s)
                s += stride
            else:
                rejected.append((s, *why))
                s = self._past(s, t)
        return starts, rejected

    def repaired(self, s: int, t: int) -> int:
        """Filled view-frames in [s, s + t)."""
        return int(self.filled[s:s + t].sum())

    def longest_usable(self) -> tuple[int, int]:
        """(start, length) of the longest run of usable frames that spans no gap (earliest on ties)."""
        best, start = (0, 0), None
        for i in range(len(self.bad) + 1):
            end = i == len(self.bad) or self.bad[i] or (start is not None and self.gap[i])
            if end and start is not None:
                if i - start > best[1]:
                    best = (start, i - start)
                start = None
            if i < len(self.bad) and not self.bad[i] and start is None:
                start = i
        return best


def attribute(lost: int, reasons: list[str]) -> dict[str, int]:
    """The ``lost`` clips of a scene's bucket split over the reasons of its refused windows, in proportion
    (largest remainders to the most frequent reason, then by name)."""
    if lost <= 0 or not reasons:
        return {}
    count = {r: reasons.count(r) for r in sorted(set(reasons))}
    share = {r: lost * n // len(reasons) for r, n in count.items()}
    for r in sorted(count, key=lambda r: (-count[r], r))[:lost - sum(share.values())]:
        share[r] += 1
    return {r: n for r, n in share.items() if n}


@dataclass
class BucketYield:
    possible: int = 0                   # clips the scenes' lengths allow
    kept: int = 0                       # in the clip index
    repaired: int = 0                   # kept clips holding a repaired view-frame
    moved: int = 0                      # kept clips placed past a run or gap (not at a multiple of the stride)
    filled: int = 0                     # repaired view-frames in kept clips
    lost: dict = field(default_factory=dict)   # reason -> clips

    @property
    def share(self) -> float:
        return self.kept / self.possible if self.possible else 0.0


@dataclass
class YieldReport:
    """Per bucket: possible, kept, repaired, lost by reason (make_clip_index fills it)."""
    buckets: dict = field(default_factory=dict)    # bucket name -> BucketYield
    max_fill_run: int = MAX_FILL_RUN

    def bucket(self, name: str) -> BucketYield:
        return self.buckets.setdefault(name, BucketYield())

    def lose(self, name: str, reason: str, n: int = 1) -> None:
        b = self.bucket(name)
        b.lost[reason] = b.lost.get(reason, 0) + n

    def warnings(self) -> list[str]:
        """One line per bucket that would be empty or keep less than LOW_YIELD of its possible clips."""
        out = []
        for name, b in sorted(self.buckets.items()):
            why = ", ".join(f"{k} {v}" for k, v in sorted(b.lost.items())) or "the scenes are too short"
            if b.kept == 0:
                out.append(f"warning: bucket {name} would be EMPTY ({b.possible} possible; lost: {why})")
            elif b.share < LOW_YIELD:
                out.append(f"warning: bucket {name} keeps {b.kept} of {b.possible} possible clips "
                           f"({b.share:.1%} < {LOW_YIELD:.0%}; lost: {why})")
        return out

    def lines(self) -> list[str]:
        """The yield table (one row per bucket) and the warnings."""
        out = [f"{'yield':<22}{'possible':>9}{'kept':>9}{'kept %':>8}{'repaired':>9}{'filled':>8}{'moved':>7}"
               f"  lost (why)"]
        for name, b in sorted(self.buckets.items()):
            why = ", ".join(f"{k} {v}" for k, v in sorted(b.lost.items())) or "-"
            out.append(f"{name:<22}{b.possible:>9}{b.kept:>9}{b.share:>8.1%}{b.repaired:>9}{b.filled:>8}"
                       f"{b.moved:>7}  {sum(b.lost.values())} ({why})")
        out.append(f"(repaired: kept clips holding a dropped image filled from the same camera's nearest round, "
                   f"filled: such view-frames; a view may miss up to max_fill_run={self.max_fill_run} consecutive "
                   f"images; moved: clips placed past an unrepairable run or gap)")
        return out + self.warnings()

    def as_dict(self) -> dict:
        return {"max_fill_run": self.max_fill_run,
                "buckets": {k: asdict(v) | {"share": v.share} for k, v in sorted(self.buckets.items())}}

    @classmethod
    def from_dict(cls, d: dict) -> "YieldReport":
        fields = set(BucketYield.__dataclass_fields__)
        return cls({k: BucketYield(**{f: x for f, x in v.items() if f in fields}) for k, v in d["buckets"].items()},
                   d.get("max_fill_run", MAX_FILL_RUN))
