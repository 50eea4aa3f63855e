"""The evaluation's report: a JSON file and a printed table (per view, then overall)."""
from __future__ import annotations

import json
import os


def describe_protocol(metric: str, p: dict) -> str:
    frames = f"first {p['frames']} frames" if p["frames"] else "all frames"
    if p.get("keyframes_only"):
        frames += " (keyframes only)"
    size = f"x{p['downsample']:g} bicubic" if p["downsample"] != 1.0 else "generated size"
    crop = f", shorter side -> {p['crop']}, centre {p['crop']}x{p['crop']}" if p["crop"] else ""
    net = "I3D (Kinetics-400 logits)" if metric == "fvd" else "InceptionV3 (2048-d pool, 299x299)"
    return f"{net}; {frames}; {size}{crop}"


def table(report: dict) -> str:
    name = report["metric"].upper()
    unit = "clips" if report["metric"] == "fvd" else "frames"
    lines = [f"{name}: {describe_protocol(report['metric'], report['protocol'])}",
             f"{report['clips']} clips, generations {report['generations']}"
             + ("" if report["weights"]["published"] else
                f"; WARNING: weights {report['weights']['path']} are a reduced network (divisor "
                f"{report['weights']['divisor']}), not the published one: not comparable"),
             f"{'view':<18}{name:>12}{'real ' + unit:>16}{'generated ' + unit:>20}"]
    for view, r in report["views"].items():
        lines.append(f"{view:<18}{r['value']:>12.2f}{r['real']:>16}{r['generated']:>20}")
    lines.append(f"{'overall':<18}{report['value']:>12.2f}{report['real_features']:>16}"
                 f"{report['generated_features']:>20}")
    c = report["cache"]
    if c["dir"]:
        lines.append(f"real features: {c['hits']} clip-views from the cache {c['dir']}, {c['computed']} computed")
    return "\n".join(lines)


def write_json(path: str, report: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
