"""Check a stage transition: the next stage's first step must start where the previous stage
ended. "Where it ended" is the loss of the previous stage's final weights on the very batch of
the next stage's first step, with that step's timesteps, noise and condition drops (recomputed
here from the previous checkpoint and the next run's config). A transition that loses what the
previous stage learned (new blocks that are not identities, weights that did not load) is far
off; a correct one is equal up to float rounding.

The next stage's first-step loss is also compared with the previous stage's smoothed training
loss on the same bucket (as logged). That figure is printed, not checked: one batch of another
draw of timesteps and noise differs from a smoothed loss by several per cent on its own (the
tiny demo's image batches: std ~5 %).

    python -m train.stage_check --prev demo_out/stages/stage1 --next demo_out/stages/stage2

Prints one line, writes NEXT/stage_check.json; exit code 1 when outside the tolerance.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pipeline.contract.cli import HelpFormatter


def read_log(run: str | Path) -> list[dict]:
    path = Path(run) / "log.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no training log; run the stage first (python -m train.train ... --out {run})")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def logged(prev: list[dict], nxt: list[dict]) -> dict:
    """The next stage's first step vs the previous stage's final smoothed loss on that bucket."""
    first = nxt[0]
    final = prev[-1].get("loss_by_bucket", {}).get(first["bucket"])
    out = {"bucket": first["bucket"], "next_first": float(first["loss"]), "prev_steps": int(prev[-1]["step"])}
    if final is not None:
        out.update(prev_final_smoothed=float(final), rel_diff_smoothed=float(first["loss"]) / float(final) - 1.0)
    return out


def same_batch_loss(prev_run: str | Path, next_run: str | Path) -> float:
    """The previous stage's final weights on the next stage's first batch (rank 0), with the draws
    of that step: what the next stage's first logged loss must equal."""
    from model.registry import build_from_config
    from train import checkpoint as ckpt
    from train.config import TrainConfig
    from train.data import BatchStream, find_shards
    from train.train import TextSource, compute_loss, seed_step, step_rng

    cfg = TrainConfig.from_dict(json.loads((Path(next_run) / "config.json").read_text()))
    src = ckpt.resolve(prev_run)
    if not cfg.init_from or ckpt.resolve(cfg.init_from) != src:
        raise ValueError(f"{next_run} was not started with --init-from {src} (its init_from: {cfg.init_from})")
    world = int(ckpt.load_state(next_run)["data"]["world"])
    model = build_from_config(ckpt.load_config(src)["model"])
    model.load_state_dict(ckpt.load_weights(src, cfg.init_weights))
    shards = find_shards(cfg.data, cfg.data.split, cfg.data.shards)
    batch = next(iter(BatchStream(shards, cfg.data, cfg.seed, 0, world, start_step=0, stop_step=1)))
    seed_step(cfg.seed, 0, 0)
    text = TextSource(cfg.data.text_cache, cfg.data.text_encoder, cfg.data.text_max_length)
    with torch.no_grad():
        return float(compute_loss(model.train(), batch, text, cfg, step_rng(cfg.seed, 0, 0),
                                  torch.device("cpu"), False))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mdv2-stage-check", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--prev", required=True, help="run folder of the previous stage")
    ap.add_argument("--next", required=True, help="run folder of the stage started from it with --init-from")
    ap.add_argument("--bucket", help="require the next stage's first step to be on this bucket (e.g. 64x128_t1)")
    ap.add_argument("--tol", type=float, default=0.10, help="allowed relative difference (default 0.10)")
    a = ap.parse_args(argv)
    try:
        r = logged(read_log(a.prev), read_log(a.next))
        if a.bucket and r["bucket"] != a.bucket:
            raise ValueError(f"the first step of {a.next} is on bucket {r['bucket']}, not {a.bucket}; "
                             "pick its seed so that it starts on that bucket, or drop --bucket")
        r["prev_final_same_batch"] = same_batch_loss(a.prev, a.next)
    except (FileNotFoundError, ValueError) as e:
        ap.error(str(e))
    r["rel_diff"] = r["next_first"] / r["prev_final_same_batch"] - 1.0
    r["tol"] = a.tol
    r["ok"] = abs(r["rel_diff"]) <= a.tol
    (Path(a.next) / "stage_check.json").write_text(json.dumps(r, indent=2))
    smoothed = (f"; the end of its smoothed training loss on the bucket: {r['prev_final_smoothed']:.4f} "
                f"({r['rel_diff_smoothed']:+.1%}, another batch)" if "prev_final_smoothed" in r else "")
    print(f"stage check {'ok' if r['ok'] else 'FAILED'}: {a.next} step 1 ({r['bucket']}) loss {r['next_first']:.4f}, "
          f"{a.prev} final weights on that batch {r['prev_final_same_batch']:.4f} ({r['rel_diff']:+.2e}, tolerance "
          f"{a.tol:.0%}){smoothed}")
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
