"""Quiet and quick (issue 24 item 6): defaults in every --help, `| head` ends quietly, caption commands print one
summary and no HTTP log lines, no empty quarantine files, the synth progress bar counts what it draws, the
synthetic captions follow the caption rules, mdv2-text exists. The no-op rebuild without Ray is tested on a real
build in tests/test_readers.py."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tomllib
from importlib import import_module
from pathlib import Path

import pytest

from pipeline.contract import cli

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def parsers_of(main, argv: list[str]) -> list[argparse.ArgumentParser]:
    """Every parser (sub-parsers too) a command builds while answering --help: recorded, not replaced."""
    seen: list[argparse.ArgumentParser] = []
    real = argparse.ArgumentParser.format_help

    def spy(self):
        seen.append(self)
        return real(self)
    argparse.ArgumentParser.format_help = spy
    try:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    finally:
        argparse.ArgumentParser.format_help = real
    return seen


def undocumented_defaults(p: argparse.ArgumentParser) -> list[str]:
    """Options with a default value whose --help line does not show it."""
    text = " ".join(p.format_help().split())
    bad = []
    for a in p._actions:
        d = a.default
        if not a.option_strings or a.nargs == 0 or d is None or d is argparse.SUPPRESS or isinstance(d, bool) \
                or (isinstance(d, (list, tuple, str)) and not d):
            continue
        helptext = " ".join((a.help or "").split())
        if "default" in helptext.lower():
            continue
        if f"(default: {d})" not in text and f"default: {d}" not in text:
            bad.append(f"{p.prog} {a.option_strings[0]} (default {d!r})")
    return bad


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_shows_every_default(script, capsys):
    module, func = SCRIPTS[script].split(":")
    main = getattr(import_module(module), func)
    parsers = parsers_of(main, ["--help"])
    assert parsers, script
    top = parsers[0]
    subs = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    for sub in subs:  # every sub-command's own --help too
        for name in sub.choices:
            parsers += parsers_of(main, [name, "--help"])
    bad = [b for p in parsers for b in undocumented_defaults(p)]
    assert bad == [], bad
    capsys.readouterr()


def test_help_formatter_shows_defaults_once():
    p = cli.ArgumentParser(prog="x", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="Euler steps")
    p.add_argument("--rpm", type=float, default=60.0, help="requests per minute (default 60)")
    p.add_argument("--quiet", action="store_true", help="no bars")
    p.add_argument("--name", help="a name")
    text = " ".join(p.format_help().split())
    assert "Euler steps (default: 30)" in text and "(default 60) (default" not in text
    assert "no bars (default" not in text and "a name (default" not in text


def test_the_defaults_check_can_fail():
    p = argparse.ArgumentParser(prog="plain")
    p.add_argument("--steps", type=int, default=30, help="Euler steps")
    assert undocumented_defaults(p) == ["plain --steps (default 30)"]


def test_piping_into_head_ends_quietly():
    """`mdv2-describe --json | head`: the reader goes away; no BrokenPipeError traceback, exit 141 as SIGPIPE."""
    # the reader's end is closed before the command writes (it is still importing): its output (3 kB) would
    # otherwise fit in the pipe's buffer and the command could finish before any reader went away
    r, w = os.pipe()
    p = subprocess.Popen([sys.executable, "-m", "model.registry", "--json"], stdout=w,
                         stderr=subprocess.PIPE, cwd=ROOT, env={**os.environ, "MDV2_DEBUG": ""})
    os.close(w)
    os.close(r)  # like head after its lines
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == cli.EXIT_PIPE
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err


def test_a_closed_pipe_is_caught_in_cli_entry():
    @cli.entry
    def main(argv):
        raise BrokenPipeError(32, "Broken pipe")
    assert main([]) == cli.EXIT_PIPE


@pytest.fixture()
def clips(tmp_path) -> Path:
    from factories_captions import write_jpeg
    root = tmp_path / "clips"
    for i, clip in enumerate(("a", "b")):
        for v in ("CAM_FRONT", "CAM_BACK"):
            write_jpeg(root / clip / v / "00000.jpg", (40 * i + 20, 90, 160))
    return root


def caption_cmd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "captions", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OPENAI_API_KEY": "EMPTY", "MDV2_DEBUG": ""}, timeout=120)


def test_caption_commands_are_quiet_and_summarise_once(clips, tmp_path):
    from openai_server import FakeOpenAI
    with FakeOpenAI() as srv:
        base = ["folder", str(clips), "--base-url", srv.base_url, "--model", srv.model, "--tile-width", "64"]
        r = caption_cmd(*base, "--out", str(tmp_path / "t.parquet"), "--quiet")
        assert r.returncode == 0, r.stderr
        assert r.stderr.strip() == "", r.stderr     # no httpx INFO line per request, no logged summary
        summary = [ln for ln in r.stdout.splitlines() if "clips" in ln]
        assert len(summary) == 1, r.stdout
        v = caption_cmd(*base, "--out", str(tmp_path / "v.parquet"), "-v")
        assert v.returncode == 0 and "HTTP Request" in v.stderr  # -v shows the requests: the check can fail
    assert not (tmp_path / "t.quarantine.parquet").exists()    # nothing failed: no empty quarantine file


def test_a_quarantine_that_empties_is_removed(tmp_path):
    from captions.table import write_quarantine_file
    from pipeline.contract.manifest import QuarantineRecord
    uri = str(tmp_path / "q.parquet")
    write_quarantine_file(uri, [])
    assert not os.path.exists(uri)
    write_quarantine_file(uri, [QuarantineRecord("captions", "a", "server_error", "500")], {"a"})
    assert os.path.exists(uri)
    write_quarantine_file(uri, [], {"a"})  # a rerun that succeeds clears it
    assert not os.path.exists(uri)


def test_synth_bar_counts_the_images_it_draws(tmp_path, capsys):
    from pipeline.synth.writer import write_dataset
    info = write_dataset(tmp_path, scenes=2, seconds=1.5, image_size=(64, 36), seed=1, drop_rate=0.2, progress=True)
    err = capsys.readouterr().err
    counts = re.findall(r"synth images:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)", err)
    assert counts, err[-500:]
    totals = {int(total) for _, total in counts}
    assert totals == {info.num_images} and int(counts[-1][0]) == info.num_images
    assert info.num_images < 2 * 18 * 6  # some images were dropped: the old bar said 0/216 and ended below it


def test_synthetic_scene_descriptions_follow_the_caption_rules(synth_dataset):
    import json
    from captions.config import CaptionConfig
    from captions.validate import check_answer
    cfg = CaptionConfig()
    scenes = json.loads((Path(synth_dataset.root) / synth_dataset.version / "scene.json").read_text())
    for s in scenes:
        check_answer(s["description"], "stop", min_chars=cfg.min_chars, max_chars=cfg.max_chars,
                     reject_object_lists=True)
        assert not re.search(r"\d", s["description"]), s["description"]  # no counts of anything
        assert "object" not in s["description"]


def test_mdv2_text_is_a_command():
    assert SCRIPTS["mdv2-text"] == "model.text:main"
    r = subprocess.run([str(Path(sys.executable).parent / "mdv2-text"), "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "tiny" in r.stdout and "build" in r.stdout
