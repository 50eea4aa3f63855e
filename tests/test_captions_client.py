"""Robustness of the caption client against the local OpenAI-compatible server: Retry-After,
errors -> retries -> quarantine, concurrency and rpm limits, key hygiene, answer validation,
image layout."""
from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest
from PIL import Image

from captions.client import CaptionFatal, RateLimiter
from captions.config import CaptionConfig, CaptionConfigError
from captions.images import View, image_hash, mosaic, openai_image_tokens, request_images
from captions.stage import caption_clips
from captions.validate import InvalidAnswer, check_answer
from pipeline.contract import schema
from tests.factories_captions import write_clip_dataset
from tests.openai_server import FakeOpenAI

SECRET = "sk-test-SECRET-7f3a9c1e5b"
TILE = 160


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("nusc")
    return root, write_clip_dataset(root, {"scene-0001": 17, "scene-0002": 17, "scene-0003": 17})


def cfg_for(srv: FakeOpenAI, **kw) -> CaptionConfig:
    base = dict(mode="mllm", base_url=srv.base_url, model=srv.model, tile_width=TILE, backoff_base_s=0.01,
                backoff_max_s=0.05, timeout_s=5.0)
    base.update(kw)
    return CaptionConfig(**base)


def test_retry_after_is_honoured(data, tmp_path):
    root, clips = data
    with FakeOpenAI(retry_after="1") as srv:
        srv.plan = ["429"]
        res = caption_clips(clips.slice(0, 1), str(root), cfg_for(srv), str(tmp_path), progress=False)
        assert [e["action"] for e in srv.log] == ["429", "ok"]
        gap = srv.log[1]["t"] - srv.log[0]["t"]
    assert gap >= 0.95  # the server asked for 1 s; our own backoff alone would be ~0.01 s
    assert res.rate_limited == 1 and res.retries == 1 and len(res.captions) == 1


def test_errors_retry_then_quarantine_and_the_run_carries_on(data, tmp_path):
    root, clips = data
    with FakeOpenAI(hang_s=3) as srv:
        # concurrency 1 + 2 attempts per item: each pair below is one item's fate, in request order
        srv.plan = ["500", "500", "hang", "hang", "malformed", "malformed", "refusal", "refusal",
                    "list", "list", "empty"]  # ... and the 6th item succeeds on its retry
        cfg = cfg_for(srv, concurrency=1, max_retries=1, timeout_s=0.5)
        res = caption_clips(clips, str(root), cfg, str(tmp_path), progress=False)
        assert srv.errors == []
        assert sorted(q.reason for q in res.quarantine) == sorted(
            ["server_error", "timeout", "malformed", "refusal", "object_list"])
        assert all(q.stage == "captions" for q in res.quarantine)
        assert len(res.captions) == 1 and res.succeeded == 1 and res.failed == 5
        assert res.http_requests == 12 and res.retries == 6
        assert not set(res.captions) & {q.item for q in res.quarantine}
        # a re-run retries only the quarantined items (answers are cached, failures are not)
        srv.reset_counts()
        again = caption_clips(clips, str(root), cfg, str(tmp_path), progress=False)
        assert srv.requests == 5 and again.quarantine == [] and len(again.captions) == 6


def test_concurrency_limit_is_respected(data, tmp_path):
    root, clips = data
    with FakeOpenAI(latency_s=0.4) as srv:
        caption_clips(clips, str(root), cfg_for(srv, concurrency=3), str(tmp_path), progress=False)
        assert srv.requests == 6
        assert 1 < srv.max_in_flight <= 3


def test_rate_limiter_spaces_request_starts():
    lim = RateLimiter(rpm=1200)  # one start every 50 ms
    t0, starts = time.monotonic(), []
    for _ in range(5):
        lim.acquire()
        starts.append(time.monotonic())
    # the k-th start is scheduled k intervals after the first (a lower bound, whatever the load)
    assert all(s - t0 >= k * 0.05 - 1e-3 for k, s in enumerate(starts))
    unlimited = RateLimiter(None)
    unlimited.acquire()  # no-op, must not block or fail


def test_api_key_never_logged_printed_or_written(data, tmp_path, monkeypatch, caplog, capsys):
    from captions.cli import main
    root, clips = data
    monkeypatch.setenv("CAPTION_TEST_KEY", SECRET)
    caplog.set_level(logging.DEBUG)  # everything, the HTTP stack included
    with FakeOpenAI(api_key=SECRET) as srv:
        srv.plan = ["500", "429"]
        srv.retry_after = "0"
        cfg = cfg_for(srv, api_key_env="CAPTION_TEST_KEY")
        res = caption_clips(clips, str(root), cfg, str(tmp_path / "a"), progress=False)
        assert srv.errors == [] and len(res.captions) == 6  # the key was sent (the server checks it)
        cfg_file = tmp_path / "captions.yaml"
        cfg_file.write_text(f"model: {srv.model}\napi_key_env: CAPTION_TEST_KEY\ntile_width: {TILE}\n")
        import pyarrow.parquet as pq
        pq.write_table(clips, tmp_path / "clips.parquet")
        rc = main(["clips", "--out", str(tmp_path / "b"), "--dataroot", str(root), "--clips",
                   str(tmp_path / "clips.parquet"), "--config", str(cfg_file), "--mode", "mllm", "--base-url",
                   srv.base_url, "-v"])
        assert rc == 0 and srv.errors == []
    out, err = capsys.readouterr()
    seen = [caplog.text, out, err, repr(cfg), str(cfg.__dict__), res.summary()]
    for path in tmp_path.rglob("*"):
        if path.is_file():
            seen.append(path.read_bytes().decode("latin-1"))
    assert "caption" in caplog.text.lower() or out  # there was output to scan
    assert not [s for s in seen if SECRET in s]


def test_auth_failure_stops_the_run_without_echoing_the_key(data, tmp_path, monkeypatch):
    root, clips = data
    monkeypatch.setenv("CAPTION_TEST_KEY", "sk-wrong-" + SECRET[-6:])
    with FakeOpenAI(api_key=SECRET) as srv:
        with pytest.raises(CaptionFatal, match="CAPTION_TEST_KEY") as e:
            caption_clips(clips, str(root), cfg_for(srv, api_key_env="CAPTION_TEST_KEY"), str(tmp_path),
                          progress=False)
        assert srv.requests <= 2 * 8  # stopped early, not one attempt per retry per item
    assert "sk-wrong" not in str(e.value)


def test_config_file_refuses_a_key_and_names_env_var(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"api_key": "sk-x", "model": "m"}))
    with pytest.raises(CaptionConfigError, match="api_key_env"):
        CaptionConfig.from_file(p)
    p.write_text(json.dumps({"captions": {"model": "m", "api_key_env": "MY_KEY", "rpm": 60}}))
    cfg = CaptionConfig.from_file(p, concurrency=2)
    assert (cfg.model, cfg.api_key_env, cfg.rpm, cfg.concurrency) == ("m", "MY_KEY", 60, 2)
    with pytest.raises(CaptionConfigError, match="layout"):
        CaptionConfig(layout="grid")


@pytest.mark.parametrize("text,reason", [
    ("", "empty"), ("   \n ", "empty"), ("Sunny.", "too_short"),
    ("I'm sorry, but I can't help with identifying details in this image.", "refusal"),
    ("As an AI language model, I cannot see images but the weather may be nice.", "refusal"),
    ("- sunny weather\n- 3 cars parked\n- a truck", "object_list"),
    ("A sunny street with 3 cars and two pedestrians near tall buildings.", "object_list"),
    ("Cars, trucks, buses and pedestrians and bicycles fill the sunny road.", "object_list"),
])
def test_validation_rejects(text, reason):
    with pytest.raises(InvalidAnswer) as e:
        check_answer(text, "stop", min_chars=20, max_chars=1500, reject_object_lists=True)
    assert e.value.reason == reason


def test_validation_accepts_and_normalises():
    t = check_answer('Caption: "A rainy evening on an urban street,\n lined with buildings and parked cars."',
                     "stop", min_chars=20, max_chars=1500, reject_object_lists=True)
    assert t == "A rainy evening on an urban street, lined with buildings and parked cars."
    with pytest.raises(InvalidAnswer, match="truncated"):
        check_answer(t, "length", min_chars=20, max_chars=1500, reject_object_lists=True)
    assert check_answer("A sunny street lined with many parked cars under a clear sky.", "stop", min_chars=20,
                        max_chars=1500, reject_object_lists=True)  # vague plurals are context, not an inventory
    assert check_answer("3 cars and 2 trucks on a sunny highway.", "stop", min_chars=5, max_chars=100,
                        reject_object_lists=False)


def test_mosaic_layout_places_views_in_a_labelled_2x3_grid():
    cols = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]
    imgs = [Image.new("RGB", (80, 40), c) for c in cols]
    m = np.asarray(mosaic(imgs, list(schema.VIEWS), tile_width=80))
    bar = (m.shape[0] // 2) - 40
    assert m.shape == (2 * (40 + bar), 3 * 80, 3) and bar >= 10
    for i, c in enumerate(cols):
        r, col = divmod(i, 3)
        y, x = r * (40 + bar) + bar + 20, col * 80 + 40  # the centre of tile i
        assert tuple(m[y, x]) == c
        assert m[r * (40 + bar):r * (40 + bar) + bar, col * 80:(col + 1) * 80].max() > 128  # label text
    views = [View(v, open_jpeg(c)) for v, c in zip(schema.VIEWS, cols)]
    assert len(request_images(views, "mosaic", 80, 90)) == 1
    assert len(request_images(views, "separate", 80, 90)) == 6
    assert image_hash(views) != image_hash(views[::-1])


def open_jpeg(c) -> bytes:
    import io
    buf = io.BytesIO()
    Image.new("RGB", (80, 40), c).save(buf, format="JPEG")
    return buf.getvalue()


def test_openai_image_token_formula_favours_the_mosaic():
    # nuScenes 1600x900 views at tile width 512: one 1536x624 mosaic vs six 512x288 images
    assert openai_image_tokens(512, 288, "high") == 85 + 170 * 1
    assert openai_image_tokens(1536, 624, "high") == 85 + 170 * 3 * 2
    assert openai_image_tokens(1536, 624, "high") < 6 * openai_image_tokens(512, 288, "high")
    assert openai_image_tokens(4096, 4096, "high") == 85 + 170 * 4  # 2048 -> 768x768
    assert openai_image_tokens(1536, 624, "low") == 85
