"""The caption stage when the server is not there or never answers: it stops with one line once its first
requests all fail the same way (fail_fast), mdv2-caption exits 3 when nothing was captioned, and the build's
--caption-timeout/--caption-retries/--caption-concurrency (or its stage config's captions: block) reach it."""
from __future__ import annotations


import pyarrow.parquet as pq
import pytest

from captions.client import CaptionsFailing
from captions.config import CaptionConfig
from captions.stage import caption_clips, stage_caption_config
from pipeline.contract import schema
from tests.factories_captions import write_clip_dataset
from tests.openai_server import FakeOpenAI
from tests.procs import free_port

SCENES = {"scene-0001": 17, "scene-0002": 17, "scene-0003": 17}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("nusc")
    return root, write_clip_dataset(root, SCENES)   # 6 clips


def _dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"


def _cfg(base_url: str, **kw) -> CaptionConfig:
    d = dict(mode="mllm", base_url=base_url, model="test-vlm", tile_width=160, backoff_base_s=0.5, backoff_max_s=1.0,
             timeout_s=5.0, concurrency=2, fail_fast=4)
    d.update(kw)
    return CaptionConfig(**d)


def test_nothing_listening_stops_after_the_first_requests(data, tmp_path):
    root, clips = data
    with pytest.raises(CaptionsFailing, match=r"the first 4 caption requests all failed the same way "
                                              r"\(connection_error"):
        caption_clips(clips, str(root), _cfg(_dead_url()), str(tmp_path), progress=False)


def test_a_server_that_never_answers_is_given_up_on_after_one_timeout_round(data, tmp_path):
    """The issue's 410 s: every request hung until its timeout and was retried 5 times. Now the first
    `fail_fast` timeouts stop the run; no thread starts another attempt."""
    root, clips = data
    with FakeOpenAI(hang_s=30) as srv:
        srv.rule = lambda images: "hang"
        with pytest.raises(CaptionsFailing, match=r"\(timeout: no answer within 1.0 s\)"):
            caption_clips(clips, str(root), _cfg(srv.base_url, timeout_s=1.0, concurrency=4), str(tmp_path),
                          progress=False)
        assert 4 <= srv.requests <= 4 + 4, srv.requests  # the first four, and at most one more per thread


def test_mixed_failures_do_not_stop_early_and_a_success_disarms_the_check(data, tmp_path):
    root, clips = data
    with FakeOpenAI() as srv:
        srv.plan = ["500", "malformed", "500", "500"]     # not all one way: carry on, and succeed
        res = caption_clips(clips, str(root), _cfg(srv.base_url, backoff_base_s=0.01), str(tmp_path / "a"),
                            progress=False)
        assert len(res.captions) == clips.num_rows
        srv.plan = ["ok"] + ["500"] * 40                  # one success first: later failures are per item
        res = caption_clips(clips, str(root), _cfg(srv.base_url, backoff_base_s=0.01, max_retries=1,
                                                   prompt_version="v0-brief"), str(tmp_path / "b"), progress=False)
        assert len(res.captions) == 1 and len(res.quarantine) == clips.num_rows - 1


def test_cli_exits_3_with_one_line_when_the_server_is_gone_or_nothing_is_captioned(data, tmp_path, capsys):
    from captions.cli import main
    root, clips = data
    (tmp_path / schema.WORK_DIR).mkdir()
    pq.write_table(clips, tmp_path / schema.CLIP_INDEX_FILE)
    args = ["clips", "--out", str(tmp_path), "--dataroot", str(root), "--mode", "mllm", "--model", "test-vlm",
            "--quiet", "--tile-width", "160", "--backoff-base", "0.01"]
    assert main(args + ["--base-url", _dead_url(), "--fail-fast", "3"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the first 3 caption requests all failed"), err
    with FakeOpenAI() as srv:  # every answer invalid, each item a different way: no early stop, nothing captioned
        srv.rule = lambda images: "refusal"
        assert main(args + ["--base-url", srv.base_url, "--max-retries", "0", "--fail-fast", "0"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: nothing captioned: all {clips.num_rows} items failed"), err


def test_build_flags_and_the_stage_config_reach_the_caption_stage(tmp_path):
    from pipeline.build import parse_args
    stage = tmp_path / "stage.yaml"
    stage.write_text("name: t\nbuckets:\n  - {height: 32, width: 64, num_frames: 1, batch_size: 2}\n"
                     "captions:\n  timeout_s: 7\n  max_retries: 1\n  concurrency: 3\n  fail_fast: 5\n")
    cfg = parse_args(["--config", str(stage), "--dataroot", "d", "--version", "v", "--out", "o", "--vae", "v",
                      "--captions", "mllm", "--caption-timeout", "2.5", "--caption-concurrency", "16"])
    cc = stage_caption_config(cfg.stage, cfg.captions, timeout_s=cfg.caption_timeout,
                              max_retries=cfg.caption_retries, concurrency=cfg.caption_concurrency)
    assert (cc.timeout_s, cc.max_retries, cc.concurrency, cc.fail_fast, cc.mode) == (2.5, 1, 16, 5, "mllm")
    with pytest.raises(Exception, match="--caption-retries must be > -1"):
        parse_args(["--config", str(stage), "--dataroot", "d", "--version", "v", "--out", "o", "--vae", "v",
                    "--caption-retries", "-2"])
