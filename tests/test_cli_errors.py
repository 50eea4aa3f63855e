"""Every command answers an input mistake with one ``error:`` line and exit code 2 (pipeline/contract/cli.py).

The real commands run in subprocesses (the console scripts of the venv, ``python pipeline/build.py``,
``python -m pipeline.synth``, ``python -m model.text``), each with a mistake that is caught before
any heavy work, so the whole file costs about one second per case. ``--debug`` and MDV2_DEBUG=1
bring the traceback back, and a bug (an exception that is not a user error) keeps its traceback.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.contract import cli

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def command(name: str) -> list[str]:
    """The command line a user types: a console script of this venv, or python + a path / module."""
    if name == "build":
        return [sys.executable, str(ROOT / "pipeline" / "build.py")]
    if name.startswith("-m "):
        return [sys.executable, "-m", name[3:]]
    return [str(BIN / name)]


def run(name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command(name) + [str(a) for a in args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "MDV2_DEBUG": "", **(env or {})}, timeout=120)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Small files the mistakes need: a dataroot with only v1.0-synth tables, a VAE folder whose config.json is
    right (nothing loads the weights before the mistake is found), broken YAML files, a caption table."""
    d = tmp_path_factory.mktemp("cli")
    (d / "data" / "v1.0-synth").mkdir(parents=True)
    (d / "data" / "v1.0-synth" / "scene.json").write_text(json.dumps([{  # a whole record: the build checks scene.json
        "token": "t" * 32, "log_token": "l" * 32, "nbr_samples": 1, "first_sample_token": "s" * 32,
        "last_sample_token": "s" * 32, "name": "scene-0001", "description": ""}]))
    (d / "vae").mkdir()
    (d / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLCogVideoX",
                                                       "scaling_factor": 1.15, "block_out_channels": [8] * 4}))
    (d / "unet").mkdir()
    (d / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    (d / "broken.yaml").write_text("buckets: [\n")
    (d / "t4.yaml").write_text("buckets:\n  - {height: 64, width: 128, num_frames: 4, batch_size: 1}\n")
    (d / "keys.yaml").write_text("optimiser: adamw\n")
    (d / "a_file").write_text("not a folder")
    (d / "empty").mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["a caption"]}), d / "captions.parquet")
    from pipeline.contract import manifest  # a build output made by an older pipeline: schema 1.x shards
    manifest.write_manifest(str(d / "old"), "train", [manifest.ShardRecord(
        "train/64x128_t9/shard-000000.tar", "train", "64x128_t9", 64, 128, 9, 1, 10, "0" * 64, "1.3", "cfg", ["k"])])
    return {"d": d, "data": d / "data", "vae": d / "vae", "out": d / "out"}


# (command, arguments, words the error line must contain); {d} {data} {vae} {out} are filled from `inputs`
MISTAKES = [
    # mdv2-synth / python -m pipeline.synth
    ("mdv2-synth", ["--out", "{out}", "--scenes", "0"], "--scenes must be >= 1"),
    ("mdv2-synth", ["--out", "{out}", "--map-name", "boston"], "invalid choice"),
    ("-m pipeline.synth", ["--out", "{out}", "--image-size", "1600by900"], "--image-size must look like"),
    ("-m pipeline.synth", ["--scenes", "2"], "required: --out"),
    # python pipeline/build.py (== mdv2-build)
    ("build", ["--config", "nope", "--dataroot", "{data}", "--version", "v1.0-synth", "--out", "{out}",
               "--vae", "{vae}"], "known stages"),
    ("build", ["--config", "{d}/broken.yaml", "--dataroot", "{data}", "--version", "v1.0-synth", "--out", "{out}",
               "--vae", "{vae}"], "not valid YAML"),
    ("build", ["--config", "{d}/t4.yaml", "--dataroot", "{data}", "--version", "v1.0-synth", "--out", "{out}",
               "--vae", "{vae}"], "8k+1"),
    ("build", ["--config", "demo", "--dataroot", "{data}", "--version", "v1.0-synth", "--out", "{out}",
               "--vae", "{d}/empty"], "has no config.json"),
    ("build", ["--config", "demo", "--dataroot", "{data}", "--version", "v1.0-synth", "--out", "{out}",
               "--vae", "{d}/unet"], "expected AutoencoderKLCogVideoX"),
    ("build", ["--config", "demo", "--dataroot", "{d}/nowhere", "--version", "v1.0-synth", "--out", "{out}",
               "--vae", "{vae}"], "is not a folder"),
    ("build", ["--config", "demo", "--dataroot", "{data}", "--version", "v1.0-trainval", "--out", "{out}",
               "--vae", "{vae}"], "--version is one of ['v1.0-synth']"),
    ("build", ["--config", "demo", "--dataroot", "{data}", "--version", "v1.0-synth", "--out", "{out}",
               "--vae", "{vae}", "--scenes", "scene-0009"], "not in"),
    ("mdv2-build", ["--config", "demo", "--out", "{out}"], "required"),
    ("mdv2-build", ["--config", "demo", "--dataroot", "{data}", "--out", "{out}", "--vae", "{vae}",
                    "--samples-per-shard", "0"], "--samples-per-shard must be > 0"),
    # mdv2-scenes
    ("mdv2-scenes", ["--dataroot", "{data}", "--version", "v1.0-mini", "--out", "{out}"], "--version is one of"),
    ("mdv2-scenes", ["--dataroot", "{data}", "--version", "v1.0-synth", "--out", "{out}", "--stage", "huge"],
     "known stages"),
    ("mdv2-scenes", ["--dataroot", "{data}", "--version", "v1.0-synth", "--out", "{out}", "--workers", "two"],
     "invalid int value"),
    # mdv2-tiny-vae
    ("mdv2-tiny-vae", ["--out", "{d}/a_file"], "is a file"),
    # mdv2-inspect
    ("mdv2-inspect", ["{d}/missing.tar"], "not found"),
    ("mdv2-inspect", ["{d}/missing.tar", "--vae", "{d}/empty"], "has no config.json"),
    ("mdv2-inspect", ["{d}/a_file", "--dataroot", "{d}/nowhere"], "--dataroot"),
    # mdv2-stats
    ("mdv2-stats", ["{d}/empty"], "no <split>/manifest.parquet"),
    ("mdv2-stats", ["{d}/empty", "--max-shards", "x"], "invalid int value"),
    # mdv2-caption
    ("mdv2-caption", ["clips", "--out", "{d}/empty", "--dataroot", "{data}", "--mode", "dataset"],
     "no clip index"),
    ("mdv2-caption", ["clips", "--out", "{d}/empty", "--dataroot", "{data}", "--config", "{d}/nope.yaml"],
     "caption config"),
    ("mdv2-caption", ["prompts", "--show", "v99"], "no prompt version"),
    ("mdv2-caption", ["paint"], "invalid choice"),
    # mdv2-describe
    ("mdv2-describe", ["--preset", "huge"], "invalid choice"),
    # mdv2-train
    ("mdv2-train", ["--config", "{d}/nope.yaml"], "train config"),
    ("mdv2-train", ["--config", "{d}/keys.yaml"], "unknown train config keys ['optimiser']"),
    ("mdv2-train", ["--resume", "{d}/empty"], "not a checkpoint folder"),
    ("mdv2-train", ["--config", "demo", "--data-root", "{d}/old", "--text-cache", "{d}/empty",
                    "--out", "{out}/run", "--steps", "1", "--no-progress"], "rebuild the shards"),
    # mdv2-sample
    ("mdv2-sample", ["--ckpt", "{d}/empty", "--vae", "{vae}", "--out", "{out}"], "not a checkpoint folder"),
    ("mdv2-sample", ["--ckpt", "{d}/empty", "--vae", "{d}/empty", "--out", "{out}"], "has no config.json"),
    # python -m model.text
    ("-m model.text", ["build", "--t5", "{d}/empty", "--captions", "{d}/captions.parquet", "--out", "{out}"],
     "no T5 config.json"),
    ("-m model.text", ["build", "--t5", "{d}/empty", "--captions", "{d}/nope.parquet", "--out", "{out}"],
     "no such caption table"),
]


def _args(args: list[str], inputs: dict) -> list[str]:
    return [a.format(**inputs) for a in args]


@pytest.mark.parametrize("name, args, words", MISTAKES, ids=[f"{m[0]}-{i}" for i, m in enumerate(MISTAKES)])
def test_mistake_is_one_error_line(inputs, name, args, words):
    r = run(name, *_args(args, inputs))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == cli.EXIT_USER, r.stderr
    assert "Traceback" not in r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert words in lines[0]


@pytest.mark.parametrize("name, args, env", [
    ("mdv2-stats", ["{d}/empty", "--debug"], {}),
    ("mdv2-scenes", ["--dataroot", "{data}", "--version", "v1.0-mini", "--out", "{out}"], {"MDV2_DEBUG": "1"}),
    ("build", ["--config", "nope", "--dataroot", "{data}", "--out", "{out}", "--vae", "{vae}", "--debug"], {}),
])
def test_debug_shows_the_traceback(inputs, name, args, env):
    r = run(name, *_args(args, inputs), env=env)
    assert r.returncode != 0
    assert "Traceback (most recent call last)" in r.stderr
    assert "pipeline.contract.cli.InputNotFound" in r.stderr


def test_help_lists_debug():
    r = run("mdv2-stats", "--help")
    assert r.returncode == 0 and "--debug" in r.stdout and cli.DEBUG_ENV in r.stdout


# ---- the wrapper itself: what counts as a user error ---------------------------------

def test_bugs_keep_their_traceback(capsys):
    @cli.entry
    def buggy(argv=None):
        return {}["missing"]  # a KeyError that is not a user's mistake

    with pytest.raises(KeyError):
        buggy([])

    @cli.entry
    def bad_value(argv=None):
        raise ValueError("a bug that happens to raise ValueError")

    with pytest.raises(ValueError):
        bad_value([])
    assert capsys.readouterr().err == ""


def test_user_errors_and_named_types(capsys):
    class DataError(Exception):
        pass

    @cli.entry(user_errors=(DataError,))
    def main(argv=None):
        raise {"name": cli.UnknownName("no preset 'x'"), "data": DataError("shard 3 is\nbroken")}[argv[0]]

    assert main(["name"]) == 2
    assert capsys.readouterr().err == "error: no preset 'x'\n"  # no KeyError quotes
    assert main(["data"]) == 2
    assert capsys.readouterr().err == "error: shard 3 is broken\n"  # one line
    with pytest.raises(cli.UnknownName):
        main(["name", "--debug"])
    # the subclasses stay what callers already catch
    assert issubclass(cli.InputNotFound, FileNotFoundError) and issubclass(cli.BadInput, ValueError)
    assert issubclass(cli.UnknownName, KeyError) and issubclass(cli.OutOfRange, IndexError)


def test_one_line_of_a_dataloader_worker_error():
    text = ("Caught ShardVersionError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
            '  File "x.py", line 1, in f\ntrain.data.ShardVersionError: shard a.tar: schema 1.2; rebuild the shards')
    assert cli.one_line(RuntimeError(text)) == "shard a.tar: schema 1.2; rebuild the shards"
