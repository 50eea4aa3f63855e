"""Figures in README.md and docs/*.md written from the code, never by hand.

    python tools/docfigures.py --write     # rewrite every generated region
    python tools/docfigures.py --check     # exit 1 naming each region that disagrees (tests/test_docs.py)

A region is `<!-- gen:NAME -->...<!-- /gen:NAME -->` (inline, or a block on its own lines); NAME picks a
generator below. Parameter counts come from model.registry (each preset built on the meta device); the
demo's shard counts from the capacity plan (pipeline/shards/plan.py, the build's own clip index and shard
plan; tests/test_build_e2e.py holds the plan equal to a real build's manifest) on the tables of the
Makefile's own `demo-data` synth command (written with --tables-only: the same tables, no images).
"""
from __future__ import annotations

import argparse
import functools
import re
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REGION = re.compile(r"<!-- gen:(?P<name>[\w:.-]+) -->(?P<body>.*?)<!-- /gen:(?P=name) -->", re.S)


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


# --- parameter counts -----------------------------------------------------------------------------------

@functools.cache
def described(preset: str) -> dict:
    from model.registry import describe
    return describe(preset)["parameters"]


@functools.cache
def stage1_params() -> int:
    import torch
    from model.registry import STAGE1_OVERRIDES, build_model, count_parameters
    with torch.device("meta"):
        return count_parameters(build_model("paper", **STAGE1_OVERRIDES))


def params_table() -> str:
    from model.registry import PRESETS
    rows = ["| preset | hidden | depth | heads | parameters | backbone blocks | ControlNet + map branch "
            "| condition encoders |", "|---|---|---|---|---|---|---|---|"]
    for name, c in PRESETS.items():
        p = described(name)
        rows.append(f"| {name} | {c.hidden} | {c.depth} | {c.heads} | {p['total']:,} | {p['backbone_blocks']:,} "
                    f"| {p['controlnet']:,} | {p['condition_encoders']:,} |")
    return "\n".join(rows)


def short(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def params_short(what: str) -> str:
    return short(stage1_params() if what == "paper-stage1" else described(what)["total"])


def paper_checkpoint() -> str:
    """16 bytes a parameter sharded (fp32 weights, EMA, two AdamW moments), 8 in the export (weights + EMA)."""
    p = described("paper")["total"]
    sharded, export = 16 * p / 1e9, 8 * p / 1e9
    return (f"{sharded:.0f} GB sharded + {export:.0f} GB export per checkpoint, "
            f"{3 * (sharded + export):.0f} GB with `keep_last: 3`")


def paper_fp32_gb() -> str:
    return f"{4 * described('paper')['total'] / 1e9:.1f} GB fp32"


# --- the demo's shards ----------------------------------------------------------------------------------

def makefile_command(module: str) -> list[str]:
    """The arguments of the Makefile line that runs `-m module` (or `module/path.py`), variables as written."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    for line in text.split("\n"):
        toks = shlex.split(line.strip()) if line.startswith("\t") else []
        for i, t in enumerate(toks):
            if (t == "-m" and i + 1 < len(toks) and toks[i + 1] == module) or t == module.replace(".", "/") + ".py":
                return toks[i + (2 if t == "-m" else 1):]
    raise LookupError(f"no Makefile line runs {module}")


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@functools.cache
def demo_plan():
    """The capacity plan of the demo build: the Makefile's synth tables and its build's --config."""
    from pipeline.shards.plan import PlanConfig, make_plan
    from pipeline.synth.cli import main as synth
    s, b = makefile_command("pipeline.synth"), makefile_command("pipeline.build")
    with tempfile.TemporaryDirectory(prefix="docfigures-") as tmp:
        root = Path(tmp, "nuscenes")
        args = ["--out", str(root), "--tables-only"] + [a for i, a in enumerate(s) if a != "--out" and
                                                        (i == 0 or s[i - 1] != "--out")]
        quiet = open(Path(tmp, "synth.log"), "w")
        old, sys.stdout = sys.stdout, quiet
        try:
            assert synth(args) == 0, f"synth {args} failed"
        finally:
            sys.stdout = old
            quiet.close()
        return make_plan(PlanConfig(stage=_flag(b, "--config"), dataroot=str(root), version=_flag(b, "--version"),
                                    progress=False))


def demo_shards_table() -> str:
    plan = demo_plan()
    rows = ["| bucket | clips | shards (train + val) | MB (planned) |", "|---|---|---|---|"]
    for name, p in sorted(plan.buckets.items()) + [("total", plan.total)]:
        rows.append(f"| {name} | {p.clips} | {p.shards} | {p.bytes / 1e6:.1f} |")
    return "\n".join(rows)


def demo_shards_total() -> str:
    return str(demo_plan().total.shards)


@functools.lru_cache(maxsize=None)
def _memory_plan(gpus: int) -> list:
    from model import memory
    return memory.plan(("1", "2", "3"), gpus, 80.0, None, 241)


def memory_plan_table(gpus: int = 8) -> str:
    """The table of `python -m model.memory --gpus 8` (the calibrated plan of the three stage configs)."""
    from model import memory
    return memory.markdown(_memory_plan(gpus), gpus, 80.0)


def memory_plan_max(stage: str, gpus: int = 8) -> str:
    """The largest peak (GB) of a stage at its own SP on `gpus` x 80 GB."""
    rows = [r for r in _memory_plan(gpus) if r["stage"] == f"stage{stage}"]
    return f"{max(r['peak_gb'] for r in rows):.0f}"


# --- regions --------------------------------------------------------------------------------------------

GENERATORS = {
    "params": params_table,
    "params-ckpt:paper": paper_checkpoint,
    "params-fp32:paper": paper_fp32_gb,
    "demo-shards": demo_shards_table,
    "demo-shards-total": demo_shards_total,
    "memory-plan": memory_plan_table,
    "memory-max:stage1": lambda: memory_plan_max("1"),
    "memory-max:stage3": lambda: memory_plan_max("3"),
    "memory-max-4:stage1": lambda: memory_plan_max("1", 4),
    "memory-max-4:stage3": lambda: memory_plan_max("3", 4),
    "memory-max-32:stage1": lambda: memory_plan_max("1", 32),
    "memory-max-32:stage3": lambda: memory_plan_max("3", 32),
}


def generate(name: str) -> str:
    if name.startswith("params:"):
        return params_short(name.split(":", 1)[1])
    if name not in GENERATORS:
        raise KeyError(f"unknown generated region {name!r}; known: params:PRESET, {', '.join(GENERATORS)}")
    return GENERATORS[name]()


def render(text: str, only=None) -> str:
    """`text` with every generated region (those whose name `only` accepts) rewritten from the code."""
    def one(m: re.Match) -> str:
        if only is not None and not only(m.group("name")):
            return m.group(0)
        body = generate(m.group("name"))
        if m.group("body").startswith("\n"):      # a block region: its content on lines of its own
            body = f"\n{body}\n"
        return f"<!-- gen:{m.group('name')} -->{body}<!-- /gen:{m.group('name')} -->"
    return REGION.sub(one, text)


def stale(only=None) -> list[str]:
    """'file: gen:NAME' for every region (that `only` accepts) whose text is not what the code gives."""
    out = []
    for f in doc_files():
        text = f.read_text()
        new = render(text, only)
        if new != text:   # the same regions in the same order, only bodies change
            out += [f"{f.relative_to(ROOT)}: gen:{n.group('name')}"
                    for o, n in zip(REGION.finditer(text), REGION.finditer(new)) if o.group("body") != n.group("body")]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python tools/docfigures.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite the generated regions in place")
    mode.add_argument("--check", action="store_true", help="exit 1 if any region disagrees with the code")
    a = ap.parse_args(argv)
    if a.check:
        bad = stale()
        for b in bad:
            print(f"stale: {b}")
        if bad:
            print("run: python tools/docfigures.py --write")
        return 1 if bad else 0
    for f in doc_files():
        text = f.read_text()
        new = render(text)
        if new != text:
            f.write_text(new)
            print(f"wrote {f.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
