"""Checkpoints that cannot lose the latest (train/checkpoint.py; issue 23 item 2): a save
interrupted at any write leaves `latest` on a complete checkpoint, pruning never removes the
checkpoint just written nor the one `latest` names, stale temporary folders go at the next
save, a new run refuses an --out holding another run, a resumed run's log has each step once;
and the export-only folder (the converter's) is a source of weights, not of a run."""
from __future__ import annotations

import builtins
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from model.registry import build_model
from tests.test_train_loop import config, data  # noqa: F401  (data: module fixture)
from tests.train_runs import cli_args
from train import checkpoint as ckpt
from train.sharding import EMA
from train.train import main, make_optimizer
from train.config import TrainConfig


SMALL = ("tiny",)                                   # the tiny model without ControlNet, one block pair:
SMALL_KW = {"depth": 1, "control_depth": 0}      # few tensors, so each save is quick


class Killed(BaseException):
    """Stands for SIGKILL: raised out of a write, nothing of the save's own code runs after it."""


def _state(seed: int):
    """A tiny model, its EMA and an AdamW that took one step: every kind of tensor a checkpoint holds."""
    torch.manual_seed(seed)
    model = build_model(*SMALL, **SMALL_KW)
    ema, opt = EMA(model), make_optimizer(TrainConfig(), model)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    ema.update(model, 0.5)
    return model, opt, ema


def _save(out: Path, step: int, st, keep_last: int = 3, export: bool = True) -> Path:
    model, opt, ema = st
    return ckpt.save_checkpoint(out, step, model, opt, ema, {"data": {"world": 1, "streams": 1}},
                                {"train": {}, "model": model.config.to_dict()}, keep_last, export)


def _assert_complete(folder: Path, st) -> None:
    """Every file of `folder` reads back the state `st` it was written from."""
    model, opt, ema = st
    fresh = build_model(*SMALL, **SMALL_KW)
    f_ema, f_opt = EMA(fresh), make_optimizer(TrainConfig(), fresh)
    ckpt.load_training_state(folder, fresh, f_opt, f_ema)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(f_ema.state_dict().values(), ema.state_dict().values()))
    for p, q in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(f_opt.state[p]["exp_avg_sq"], opt.state[q]["exp_avg_sq"])
    export = ckpt.load_weights(folder, "model")
    assert all(torch.equal(export[k], v) for k, v in model.state_dict().items())


class Writes:
    """Counts the save's filesystem mutations (opens for writing, renames, deletions, safetensors
    writes) and raises Killed at the `kill_at`-th one."""

    def __init__(self, monkeypatch, kill_at: int | None = None):
        self.n, self.kill_at = 0, kill_at
        for mod, name in ((builtins, "open"), (io, "open"), (os, "replace"), (os, "rename"), (os, "mkdir"),
                          (shutil, "rmtree"), (ckpt, "save_file")):
            real = getattr(mod, name)
            monkeypatch.setattr(mod, name, self._wrap(real, name == "open"))

    def _wrap(self, real, is_open: bool):
        def call(*a, **kw):
            mode = a[1] if len(a) > 1 else kw.get("mode", "r")
            if not is_open or any(c in mode for c in "wax+"):
                self.n += 1
                if self.n == self.kill_at:
                    raise Killed(f"write {self.n}")
            return real(*a, **kw)
        return call


def test_a_save_killed_at_any_write_leaves_latest_on_a_complete_checkpoint(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    one, two = _state(1), _state(2)
    base = tmp_path / "base"
    _save(base, 1, one)
    shutil.copytree(base, tmp_path / "count")
    with monkeypatch.context() as m:        # how many writes a save of step 2 makes
        count = Writes(m)
        _save(tmp_path / "count", 2, two)
    assert count.n >= 8
    for k in range(1, count.n + 1):
        run = tmp_path / f"kill{k}"
        shutil.copytree(base, run)
        with monkeypatch.context() as m:
            Writes(m, kill_at=k)
            with pytest.raises(BaseException):
                _save(run, 2, two)
        latest = ckpt.resolve(run)                              # always a complete checkpoint ...
        _assert_complete(latest, one if latest.name == "step-0000001" else two)
        assert latest.name in ("step-0000001", ".tmp-step-0000002", "step-0000002")
        # ... and the next save cleans what the killed one left
        _save(run, 2, two)
        left = sorted(p.name for p in (run / ckpt.CKPT_DIR).iterdir())
        assert left == [ckpt.LATEST, "step-0000001", "step-0000002"], (k, left)
        _assert_complete(ckpt.resolve(run), two)


def test_pruning_keeps_the_checkpoint_just_written_and_the_one_latest_names(tmp_path):
    """A new history in a folder with higher steps (a fresh run or a resume from an earlier step):
    sorting by name would prune the new checkpoint and leave `latest` naming nothing."""
    torch.set_num_threads(1)
    st = _state(0)
    for step in (800, 900):
        _save(tmp_path, step, st, keep_last=2)
    new = _save(tmp_path, 100, st, keep_last=2)
    assert ckpt.resolve(tmp_path) == new and new.exists()
    _assert_complete(ckpt.resolve(tmp_path), st)
    root = tmp_path / ckpt.CKPT_DIR
    assert (root / "step-0000800").exists() and (root / "step-0000900").exists()   # another history: left alone
    for step in (200, 300):
        _save(tmp_path, step, st, keep_last=2)
    assert sorted(p.name for p in root.glob("step-*")) == ["step-0000200", "step-0000300", "step-0000800",
                                                          "step-0000900"]
    # never the one `latest` names, even below the kept window
    (root / ckpt.LATEST).write_text("step-0000200")
    gone = ckpt.prune(root, root / "step-0000900", keep_last=1)
    assert sorted(p.name for p in gone) == ["step-0000300", "step-0000800"]
    assert ckpt.resolve(tmp_path).name == "step-0000200"


def test_stale_temporary_folders_go_at_the_next_save(tmp_path):
    torch.set_num_threads(1)
    st = _state(0)
    root = tmp_path / ckpt.CKPT_DIR
    for junk in (".tmp-step-0000005-4242", ".tmp-step-0000007"):   # killed saves, old and new naming
        (root / junk / ckpt.SHARDED).mkdir(parents=True)
        (root / junk / "model.safetensors").write_bytes(b"half")
    _save(tmp_path, 10, st)
    assert sorted(p.name for p in root.iterdir()) == [ckpt.LATEST, "step-0000010"]


def test_export_only_folders_give_weights_not_runs(tmp_path):
    """The converter's folder (the three export files) serves --init-from and sampling; --resume refuses it."""
    torch.set_num_threads(1)
    st = _state(0)
    full = _save(tmp_path / "run", 1, st)
    conv = tmp_path / "converted"
    conv.mkdir()
    for name in ckpt.EXPORT:
        shutil.copy(full / name, conv / name)
    assert ckpt.resolve(conv) == conv and ckpt.load_config(conv)["model"]["depth"] == 1
    assert ckpt.load_weights(conv, "ema").keys() == st[0].state_dict().keys()
    with pytest.raises(FileNotFoundError, match="--init-from"):
        ckpt.load_state(conv)
    assert main(["--resume", str(conv), "--out", str(tmp_path / "x")]) == 2


def test_export_false_then_export_from_the_shards(tmp_path, capsys):
    torch.set_num_threads(1)
    st = _state(3)
    with_export = _save(tmp_path / "a", 1, st)
    without = _save(tmp_path / "b", 1, st, export=False)
    assert not (without / "model.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="train.checkpoint export"):
        ckpt.load_weights(without)
    assert ckpt.main(["export", str(tmp_path / "b")]) == 0
    for which in ("model", "ema"):
        a, b = ckpt.load_weights(with_export, which), ckpt.load_weights(without, which)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- the trainer's run folder -----------------------------------------------------------------

def _cli(cfg, *extra: str) -> list[str]:
    return [*cli_args(cfg), *extra]


def test_a_new_run_refuses_an_out_holding_another_run(data, capsys):
    torch.set_num_threads(1)
    cfg = config(data, "taken", 1)
    assert main(_cli(cfg)) == 0
    first = ckpt.resolve(cfg.out)
    capsys.readouterr()
    assert main(_cli(cfg, "--seed", "7")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --out") and "--resume" in err[0] and "--overwrite" in err[0]
    assert ckpt.resolve(cfg.out) == first and len((Path(cfg.out) / "log.jsonl").read_text().splitlines()) == 1
    assert main(_cli(cfg, "--seed", "7", "--overwrite")) == 0      # told: starts over
    assert json.loads((Path(cfg.out) / "config.json").read_text())["seed"] == 7
    assert len((Path(cfg.out) / "log.jsonl").read_text().splitlines()) == 1
    assert main(_cli(cfg, "--overwrite", "--resume")) == 2
    # --overwrite never deletes the checkpoint a new stage starts from
    capsys.readouterr()
    assert main(_cli(cfg, "--overwrite", "--init-from", cfg.out)) == 2
    assert "--init-from" in capsys.readouterr().err and ckpt.resolve(cfg.out).exists()


def test_a_resume_from_an_earlier_checkpoint_truncates_the_log(data):
    """The run logged steps 1-3 (checkpoints at 2 and 3); resumed from step 2 it redoes step 3: once in the log."""
    torch.set_num_threads(1)
    cfg = config(data, "relog", 3)
    assert main(_cli(cfg, "--set", "ckpt_every=2")) == 0
    step2 = Path(cfg.out) / ckpt.CKPT_DIR / "step-0000002"
    before = [json.loads(line) for line in (Path(cfg.out) / "log.jsonl").read_text().splitlines()]
    assert main(["--no-progress", "--out", cfg.out, "--resume", str(step2)]) == 0
    after = [json.loads(line) for line in (Path(cfg.out) / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in after] == [1, 2, 3]
    assert [r["loss"] for r in after] == [r["loss"] for r in before]   # and redone exactly
    assert ckpt.truncate_log(Path(cfg.out) / "log.jsonl", 3) == 0
