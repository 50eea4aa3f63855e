"""The build's yield from the real run: per bucket, clips possible on the scenes' length, kept in the clip
index, repaired (holding a dropped image filled from the same camera's nearest round), written to shards, and
lost with the reason -- at the clip index (pipeline/scenes/clipyield.py: fill_run, gap, image_too_small) or
later (no caption, a bad frame, non-finite latents, a failed shard, a build stopped early).

pipeline/build.py calls ``build_yield`` once the shards are written; the summary prints ``yield_lines`` and
the dataset card carries ``yield_markdown`` (pipeline/shards/write.py). mdv2-plan prints the clip-index half
before any work (pipeline/shards/plan.py).
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable

from pipeline.scenes.clipyield import LOW_YIELD, YieldReport

LATER_STAGES = ("frames", "encode", "write")


def build_yield(report: YieldReport, bucket_of: dict[str, str], captioned: set[str], records: Iterable,
                quarantine: Iterable) -> dict:
    """``report``: make_clip_index's tally; ``bucket_of``: clip key -> its clip-index bucket (a "full" clip's
    shard is named by its actual length); ``captioned``: keys with a caption; ``records``: the manifest's
    ShardRecords; ``quarantine``: every QuarantineRecord of the run."""
    d = report.as_dict()
    written = {k for r in records for k in r.keys}
    later = {q.item: q.reason for q in quarantine if q.stage in LATER_STAGES and q.item in bucket_of}
    lost_later: dict[str, Counter] = {}
    for key, bucket in bucket_of.items():
        if key in written:
            continue
        why = "no_caption" if key not in captioned else later.get(key, "not_written")
        lost_later.setdefault(bucket, Counter())[why] += 1
    for name, b in d["buckets"].items():
        b["written"] = sum(1 for k, bk in bucket_of.items() if bk == name and k in written)
        b["lost_after_index"] = dict(sorted(lost_later.get(name, Counter()).items()))
    return d


def _why(b: dict) -> str:
    lost = Counter(b.get("lost", {})) + Counter(b.get("lost_after_index", {}))
    return ", ".join(f"{k} {v}" for k, v in sorted(lost.items())) or "-"


def _rows(d: dict):
    for name, b in sorted(d.get("buckets", {}).items()):
        possible, written = b["possible"], b.get("written", b["kept"])
        yield name, b, possible, written, (written / possible if possible else 0.0)


def yield_lines(d: dict) -> list[str]:
    """The summary's yield table and one warning line per bucket that ended empty or below LOW_YIELD."""
    if not d:
        return []
    out = [f"{'yield':<22}{'possible':>9}{'kept':>7}{'repaired':>9}{'written':>8}{'share':>7}  lost (why)"]
    warn = []
    for name, b, possible, written, share in _rows(d):
        out.append(f"{name:<22}{possible:>9}{b['kept']:>7}{b['repaired']:>9}{written:>8}{share:>7.1%}  {_why(b)}")
        if written == 0:
            warn.append(f"warning: bucket {name} is EMPTY ({possible} possible; lost: {_why(b)})")
        elif share < LOW_YIELD:
            warn.append(f"warning: bucket {name} has {written} of {possible} possible clips ({share:.1%})")
    return out + warn


def yield_markdown(d: dict | None) -> str:
    """The dataset card's yield section (empty without a report)."""
    if not d:
        return ""
    rows = "\n".join(f"| {name} | {possible} | {b['kept']} | {b['repaired']} | {b['filled']} | {written} | "
                     f"{share:.1%} | {_why(b)} |" for name, b, possible, written, share in _rows(d))
    return f"""
## Yield (clips per bucket)
Possible = the clips the scenes' lengths allow; kept = in the clip index; repaired = kept clips holding a
dropped camera image filled with the nearest image of the same camera (previous or next trigger round, at that
image's own exposure; `fill_mask.npy`, meta `filled`), filled = such view-frames; written = samples in the
shards. A view may miss up to {d.get('max_fill_run')} consecutive images (`max_fill_run`).

| bucket | possible | kept | repaired | filled | written | share | lost (why) |
| --- | --- | --- | --- | --- | --- | --- | --- |
{rows}
"""
