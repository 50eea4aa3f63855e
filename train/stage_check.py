"""Check a stage transition from the two runs' logs: the next stage's first step on a bucket
must start where the previous stage ended (its smoothed loss on that bucket), within a tolerance.
A transition that loses what the previous stage learned (temporal blocks that are not identities
at insertion, weights that did not load) starts near the loss of an untrained model instead.

    python -m train.stage_check --prev demo_out/stages/stage1 --next demo_out/stages/stage2 --bucket 64x128_t1

Prints one line and writes the figures to NEXT/stage_check.json; exit code 1 when outside.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_log(run: str | Path) -> list[dict]:
    path = Path(run) / "log.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no training log; run the stage first (python -m train.train ... --out {run})")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def transition(prev: list[dict], nxt: list[dict], bucket: str) -> dict:
    """{prev_final, next_first, rel_diff}: the previous stage's final smoothed loss on `bucket`
    (EMA 0.9 over its steps on that bucket, as logged) vs the loss of the next stage's first step on it."""
    final = prev[-1].get("loss_by_bucket", {}).get(bucket)
    if final is None:
        raise ValueError(f"the previous stage never trained on bucket {bucket!r} "
                         f"(its buckets: {sorted(prev[-1].get('loss_by_bucket', {}))})")
    first = next((r for r in nxt if r["bucket"] == bucket), None)
    if first is None:
        raise ValueError(f"the next stage has no step on bucket {bucket!r}; train it longer or pick another bucket")
    return {"bucket": bucket, "prev_final": float(final), "prev_steps": int(prev[-1]["step"]),
            "next_first": float(first["loss"]), "next_step": int(first["step"]),
            "rel_diff": float(first["loss"]) / float(final) - 1.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mdv2-stage-check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prev", required=True, help="run folder of the previous stage")
    ap.add_argument("--next", required=True, help="run folder of the stage started from it with --init-from")
    ap.add_argument("--bucket", required=True, help="bucket both stages train on, e.g. 64x128_t1")
    ap.add_argument("--tol", type=float, default=0.10, help="allowed relative difference (default 0.10)")
    a = ap.parse_args(argv)
    try:
        r = transition(read_log(a.prev), read_log(a.next), a.bucket)
    except (FileNotFoundError, ValueError) as e:
        ap.error(str(e))
    r["tol"] = a.tol
    r["ok"] = abs(r["rel_diff"]) <= a.tol
    (Path(a.next) / "stage_check.json").write_text(json.dumps(r, indent=2))
    print(f"stage check {'ok' if r['ok'] else 'FAILED'}: {a.next} step {r['next_step']} on {r['bucket']}: loss "
          f"{r['next_first']:.4f} vs {r['prev_final']:.4f} at the end of {a.prev} ({r['rel_diff']:+.1%}, "
          f"tolerance {a.tol:.0%})")
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
