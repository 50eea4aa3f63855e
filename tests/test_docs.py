"""Docs that stay true: every fenced command block of README.md and docs/*.md carries a `<!-- cmd: ... -->`
marker saying what runs it (tests/docblocks.py lists the kinds), the make-target blocks are the Makefile's
own commands, every flag a doc passes is one its command's parser defines, the doc-test blocks run here,
and figures written from the code (tools/docfigures.py) are what the code gives today."""
from __future__ import annotations

import contextlib
import importlib
import io
import re
from pathlib import Path

import pytest

import docblocks as d

KINDS = {"make", "doc-test", "sketch", "real-data", "manual"}
REASONED = {"sketch", "real-data", "manual"}


def shell_blocks() -> list[d.Block]:
    return [b for b in d.all_blocks() if b.lang in d.SHELL_LANGS]


def test_every_fence_names_its_language_and_every_command_block_has_a_marker():
    bare = [b.where for b in d.all_blocks() if not b.lang]
    assert not bare, f"fences without a language (```bash, ```text, ...): {bare}"
    missing = [b.where for b in d.all_blocks() if b.lang in d.NEEDS_MARKER and b.marker is None]
    assert not missing, ("blocks without a `<!-- cmd: ... -->` marker on the line before the fence "
                         f"(make TARGET | tests/x.py::name | doc-test | real-data — why | ...): {missing}")


def test_markers_are_known_and_the_untested_ones_say_why():
    blocks = [b for b in d.all_blocks() if b.marker is not None]
    assert len(blocks) > 30
    for b in blocks:
        kind = b.kind
        assert kind in KINDS or re.match(r"tests/test_\w+\.py::\w+$", kind), f"{b.where}: unknown marker {b.marker!r}"
        if kind in REASONED:
            reason = b.marker[len(kind):].lstrip(" —-")
            assert len(reason) >= 15, f"{b.where}: a {kind} marker says why no test runs it: {b.marker!r}"


def test_test_markers_name_tests_that_exist():
    for b in d.all_blocks():
        if b.kind.startswith("tests/"):
            path, name = b.kind.split("::")
            assert Path(d.ROOT, path).exists() and name in d.test_names(path), f"{b.where}: no test {b.kind}"


def _recipe_calls(target: str) -> list[d.Call]:
    return [c for line in d.recipe(target) for cmd in d.commands(line) if (c := d.resolve(cmd))]


def test_make_blocks_are_the_makefile_recipes():
    _, targets = d.makefile()
    checked = 0
    for b in d.all_blocks():
        if b.kind != "make":
            continue
        names = b.marker.split()[1:]
        assert names and all(t in targets for t in names), f"{b.where}: {b.marker!r} names no Makefile target"
        recipe = [c for t in names for c in _recipe_calls(t)]
        for cmd in d.commands(b.text):
            if cmd[0] == "make":
                assert cmd[1] in targets, f"{b.where}: `make {cmd[1]}`: no such target"
                continue
            call = d.resolve(cmd)
            assert call is not None, f"{b.where}: `{' '.join(cmd)}` runs nothing of this project"
            pos, flags = d.pairs(call.args)
            same = [r for r in recipe if r.module == call.module and d.pairs(r.args)[0] == pos]
            assert same, f"{b.where}: `{call.shown}` is not in the recipe of {names} (Makefile)"
            ok = [r for r in same if all(d.pairs(r.args)[1].get(k, "<absent>") == v for k, v in flags.items())]
            assert ok, f"{b.where}: `{call.shown}` differs from the Makefile's `{' '.join(same[0].args)}`"
            checked += 1
    assert checked >= 7


def test_every_flag_a_doc_passes_is_one_its_command_defines():
    bad, seen = [], set()
    for b in shell_blocks():
        for cmd in d.commands(b.text):
            call = d.resolve(cmd)
            if call is None:
                continue
            assert importlib.util.find_spec(call.module), f"{b.where}: `{call.shown}`: no module {call.module}"
            prog, unknown = d.unknown_flags(call)
            seen.add(call.module)
            bad += [f"{b.where}: {prog} has no {f}" for f in unknown]
    assert not bad, "\n".join(bad)
    assert len(seen) >= 12, sorted(seen)


def test_every_flag_of_a_command_in_the_prose_is_one_its_command_defines():
    bad, n = [], 0
    for f in d.doc_files():
        for toks in d.inline_commands(f):
            n += 1
            prog, unknown = d.unknown_flags(d.resolve(toks))
            bad += [f"{f.relative_to(d.ROOT)}: `{' '.join(toks)}`: {prog} has no {u}" for u in unknown]
    assert not bad, "\n".join(bad)
    assert n > 100


def test_sketch_blocks_import_what_they_name():
    for b in d.all_blocks():
        if b.kind == "sketch" and b.lang == "python":
            exec(compile(d.python_imports(b.text), b.where, "exec"), {})  # noqa: S102


def _demo_region(name: str) -> bool:
    return name.startswith("demo-")


def test_the_parameter_counts_and_memory_plan_in_the_docs_are_the_models():
    from tools import docfigures
    stale = docfigures.stale(only=lambda n: not _demo_region(n))
    assert not stale, f"{stale}: run python tools/docfigures.py --write"
    names = {m.group("name") for f in docfigures.doc_files() for m in docfigures.REGION.finditer(f.read_text())}
    assert {"params", "params:tiny", "params:paper", "demo-shards", "demo-shards-total",
            "memory-plan", "memory-max:stage3"} <= names


@pytest.mark.slow
def test_the_demo_shard_counts_in_the_docs_are_the_plans():
    """The plan of the Makefile's demo data (synth tables + plan, ~10-20 s; the plan equals a real build's
    manifest: tests/test_build_e2e.py)."""
    from tools import docfigures
    stale = docfigures.stale(only=_demo_region)
    assert not stale, f"{stale}: run python tools/docfigures.py --write"


def test_a_hand_written_figure_cannot_hide_in_a_generated_region():
    from tools import docfigures
    text = "a <!-- gen:params:tiny -->766k<!-- /gen:params:tiny --> model\n<!-- gen:params -->\nold\n<!-- /gen:params -->"
    new = docfigures.render(text)
    from model.registry import describe
    n = describe("tiny")["parameters"]["total"]
    assert f"<!-- gen:params:tiny -->{n / 1e3:.0f}k<!-- /gen:params:tiny -->" in new
    assert f"| tiny | 64 | 2 | 4 | {n:,} |" in new and "old" not in new


def test_demo_paths_named_in_docs_and_help_are_ones_make_demo_writes():
    """demo_out/X in a doc or a command's --help text is a folder the Makefile's demo writes."""
    variables, targets = d.makefile()
    written = {m for t in ("demo-data", "demo", "stages") for line in targets[t][1]
               for m in re.findall(r"\$\(DEMO\)/([\w.-]+)", line)} | {"stages"}
    texts = {str(f.relative_to(d.ROOT)): f.read_text() for f in d.doc_files()}
    for script, module in d.scripts().items():
        texts[f"{script} --help"] = d.parser_of(module).format_help()
    bad = [f"{where}: demo_out/{name}" for where, text in texts.items()
           for name in re.findall(r"demo_out/([\w.-]+)", text) if name not in written]
    assert not bad, f"paths the demo does not write (Makefile: {sorted(written)}): {bad}"


def test_config_paths_named_in_docs_exist():
    bad = []
    for f in d.doc_files():
        for p in re.findall(r"(?<![\w/])((?:train/|pipeline/)?configs/[\w/]+\.yaml)", f.read_text()):
            if not re.search(r"[A-Z]", p) and not (d.ROOT / p).exists():   # NAME, stageN: placeholders
                bad.append(f"{f.relative_to(d.ROOT)}: {p}")
    assert not bad, bad


# --- doc-test blocks ------------------------------------------------------------------------------------

def _sandboxed(args: list[str], root: Path) -> list[str]:
    """demo_out/ and /tmp/ moved under the test's folder."""
    return [re.sub(r"^/tmp/|demo_out", lambda m: f"{root}/tmp/" if m.group(0) == "/tmp/" else f"{root}/demo_out", a)
            for a in args]


def _run_doc_tests(slow: bool, root: Path) -> int:
    ran = 0
    for b in shell_blocks():
        words = (b.marker or "").split()
        if b.kind != "doc-test" or ("slow" in words) != slow:
            continue
        text = b.text
        if "demo_out/nuscenes" in text and not (root / "demo_out" / "nuscenes").exists():
            _demo_tables(root / "demo_out" / "nuscenes")
        for cmd in d.commands(text):
            call = d.resolve(cmd)
            assert call is not None, f"{b.where}: a doc-test block runs project commands only: {cmd}"
            main = importlib.import_module(call.module).main
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                rc = main(_sandboxed(call.args, root))
            assert rc in (0, None), f"{b.where}: `{call.shown}` exited {rc}:\n{out.getvalue()[-2000:]}"
            ran += 1
    return ran


def _demo_tables(root: Path) -> None:
    """The tables of the Makefile's demo synth command (--tables-only: no images; the plan needs none)."""
    from pipeline.synth.cli import main as synth
    from tools.docfigures import makefile_command
    s = makefile_command("pipeline.synth")
    args = [a for i, a in enumerate(s) if a != "--out" and (i == 0 or s[i - 1] != "--out")]
    with contextlib.redirect_stdout(io.StringIO()):
        assert synth(["--out", str(root), "--tables-only", *args]) == 0


def test_doc_test_blocks_run(tmp_path):
    assert _run_doc_tests(False, tmp_path) >= 1


@pytest.mark.slow
def test_slow_doc_test_blocks_run(tmp_path):
    assert _run_doc_tests(True, tmp_path) >= 2
    assert (tmp_path / "tmp" / "s" / "v1.0-synth" / "scene.json").exists()
