"""Where a build's time went: Ray's task timeline summed per stage.

``mdv2-build ... --timeline FILE`` writes Ray's chrome://tracing JSON (``ray.timeline``).
Each complete event ("ph": "X") is one task or actor call on one worker; this sums them per
stage (the task name: frames_task, EncodeActor.__init__ / .run, shard_task, scene_task):
busy seconds, calls, the first start and last end (the stage's span), and for each stage
the busy share of its workers over the span, so an idle encoder shows as a low share.

    python -m pipeline.tools.timeline FILE        # a table; bench/encode.py reads stage_busy()
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

from pipeline.contract.cli import HelpFormatter


def _stage(event: dict) -> str | None:
    """'task::frames_task' -> 'frames_task', 'task::EncodeActor.run' -> 'EncodeActor.run'; None for the
    sub-phases of a task ('task:execute', ...) and the driver's submit events."""
    cat = str(event.get("cat", ""))
    if event.get("ph") != "X" or "dur" not in event or not cat.startswith("task::"):
        return None
    return cat[len("task::"):]


def stage_busy(events: list[dict]) -> dict[str, dict]:
    """{stage: {"busy_s", "calls", "workers", "start_s", "end_s", "share"}}; times in seconds from the
    first event of the timeline; share = busy / (workers x span)."""
    xs = [(s, e) for e in events if (s := _stage(e))]
    if not xs:
        return {}
    t0 = min(float(e["ts"]) for _, e in xs)
    out: dict[str, dict] = {}
    acc: dict[str, list] = defaultdict(list)
    for s, e in xs:
        acc[s].append(e)
    for s, es in sorted(acc.items()):
        start = (min(float(e["ts"]) for e in es) - t0) / 1e6
        end = (max(float(e["ts"]) + float(e["dur"]) for e in es) - t0) / 1e6
        busy = sum(float(e["dur"]) for e in es) / 1e6
        workers = len({(e.get("pid"), e.get("tid")) for e in es})
        out[s] = {"busy_s": busy, "calls": len(es), "workers": workers, "start_s": start, "end_s": end,
                  "share": busy / max(workers * (end - start), 1e-9)}
    return out


def read_timeline(path: str) -> list[dict]:
    with open(path) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.tools.timeline", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("timeline", help="a JSON file written by mdv2-build --timeline")
    a = ap.parse_args(argv)
    try:
        stages = stage_busy(read_timeline(a.timeline))
    except (OSError, ValueError, KeyError) as e:
        print(f"error: cannot read timeline {a.timeline}: {e}", file=sys.stderr)
        return 2
    print(f"{'stage':<28}{'calls':>7}{'workers':>8}{'busy s':>9}{'span s':>15}{'busy share':>11}")
    for s, v in stages.items():
        print(f"{s:<28}{v['calls']:>7}{v['workers']:>8}{v['busy_s']:>9.2f}{v['start_s']:>7.1f}-{v['end_s']:<7.1f}"
              f"{v['share']:>11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
