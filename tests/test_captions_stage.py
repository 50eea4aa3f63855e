"""The caption stage on a clip index: modes, the real openai client against the local server,
cache + de-dup, resume after a killed run, and the CLI."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from captions.config import CaptionConfig, CaptionConfigError, load_prompt
from captions.stage import caption_clips
from captions.table import CAPTION_SCHEMA, read_captions
from pipeline.contract import schema
from tests.factories_captions import write_clip_dataset
from tests.openai_server import FakeOpenAI, describe

REPO = Path(__file__).resolve().parents[1]
SCENES = {"scene-0001": 17, "scene-0002": 17, "scene-0003": 17}
TILE = 160  # small tiles keep image work cheap on 2 shared cores


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("nusc")
    clips = write_clip_dataset(root, SCENES)                       # 6 clips, distinct middle frames
    small = write_clip_dataset(root, SCENES, height=32, width=64)  # same frames, another bucket
    return root, clips, small


def mllm_cfg(server: FakeOpenAI, **kw) -> CaptionConfig:
    base = dict(mode="mllm", base_url=server.base_url, model=server.model, tile_width=TILE, backoff_base_s=0.01,
                backoff_max_s=0.05, timeout_s=5.0)
    base.update(kw)
    return CaptionConfig(**base)


def expected_caption(root: Path, paths: list[str], tile_width: int = TILE) -> str:
    """What the server says for a clip: describe() of the mosaic the client sends."""
    from captions.images import View, request_images
    views = [View(Path(p).parent.name, (root / p).read_bytes()) for p in paths]
    (_, jpeg), = request_images(views, "mosaic", tile_width, 90)
    import io
    return describe([Image.open(io.BytesIO(jpeg)).convert("RGB")])


def test_mllm_request_checked_and_answers_land_per_clip(data, tmp_path):
    root, clips, _ = data
    with FakeOpenAI(expect_prompt=load_prompt("v1")[:200]) as srv:
        res = caption_clips(clips, str(root), mllm_cfg(srv), str(tmp_path), progress=False)
        assert srv.errors == []                     # model, prompt and decodable images all checked
        assert srv.requests == clips.num_rows == 6
        assert all(e["images"] == 1 for e in srv.log)  # default layout: one mosaic per request
    assert sorted(res.captions) == sorted(clips.column("key").to_pylist())
    for row in clips.to_pylist():
        text, meta = res.captions[row["key"]]
        assert text == expected_caption(root, row["middle_frame_paths"])
        assert meta == {"source": "mllm", "prompt_version": "v1", "model": "test-vlm"}
        assert set(meta) == set(schema.CAPTION_META_FIELDS)
    table = read_captions(str(tmp_path / schema.CAPTIONS_FILE))
    assert table.schema.equals(CAPTION_SCHEMA)
    assert table.num_rows == 6 and set(table.column("source").to_pylist()) == {"mllm"}
    assert min(table.column("prompt_tokens").to_pylist()) > 0
    assert res.prompt_tokens == 600 and res.quarantine == []


def test_separate_layout_sends_one_image_per_view(data, tmp_path):
    root, clips, _ = data
    with FakeOpenAI() as srv:
        caption_clips(clips.slice(0, 1), str(root), mllm_cfg(srv, layout="separate"), str(tmp_path),
                      progress=False)
        assert srv.errors == [] and [e["images"] for e in srv.log] == [6]


def test_cache_rerun_and_identical_middle_frames_cost_one_request(data, tmp_path):
    root, clips, small = data
    both = pa.concat_tables([clips, small])   # 12 clips, 6 distinct middle frames
    with FakeOpenAI() as srv:
        res = caption_clips(both, str(root), mllm_cfg(srv), str(tmp_path), progress=False)
        assert srv.requests == 6 and res.unique_images == 6 and len(res.captions) == 12
        first = (tmp_path / schema.CAPTIONS_FILE).read_bytes()
        again = caption_clips(both, str(root), mllm_cfg(srv), str(tmp_path), progress=False)
        assert srv.requests == 6 and again.cached == 6 and again.requested == 0
        assert again.captions == res.captions
        assert (tmp_path / schema.CAPTIONS_FILE).read_bytes() == first  # nothing new -> identical bytes
        # a new prompt version or model is a new cache key: asks again, keeps the old rows
        caption_clips(both, str(root), mllm_cfg(srv, prompt_version="v0-brief"), str(tmp_path), progress=False)
        assert srv.requests == 12
    table = read_captions(str(tmp_path / schema.CAPTIONS_FILE))
    assert sorted(set(table.column("prompt_version").to_pylist())) == ["v0-brief", "v1"]
    assert table.num_rows == 24


def test_modes_dataset_and_none(data, tmp_path):
    root, clips, _ = data
    res = caption_clips(clips, str(root), CaptionConfig(mode="dataset"), str(tmp_path), progress=False)
    twin = caption_clips(clips, str(root), CaptionConfig(mode="dataset"), str(tmp_path / "twin"), progress=False)
    assert twin.captions == res.captions  # same inputs -> byte-identical table
    assert (tmp_path / "twin" / schema.CAPTIONS_FILE).read_bytes() == (tmp_path / schema.CAPTIONS_FILE).read_bytes()
    for row in clips.to_pylist():
        text, meta = res.captions[row["key"]]
        assert text == f"Sunny, city street, parked cars. ({row['scene_name']})"  # from v1.0-mini/scene.json
        assert meta == {"source": "dataset", "prompt_version": None, "model": None}
    given = caption_clips(clips, str(root), CaptionConfig(mode="dataset"), str(tmp_path),
                          scene_descriptions={"scene-0001": "Rain, night."}, progress=False)
    assert given.captions[clips.column("key")[0].as_py()][0] == "Rain, night."
    assert {q.reason for q in given.quarantine} == {"no_scene_description"}  # the two other scenes
    none = caption_clips(clips, str(root), CaptionConfig(mode="none"), str(tmp_path), progress=False)
    assert list(none.captions.values()) == [("", {"source": "none", "prompt_version": None, "model": None})] * 6


def test_mllm_without_endpoint_is_a_clear_error(data, tmp_path, monkeypatch):
    root, clips, _ = data
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(CaptionConfigError, match="OPENAI_BASE_URL"):
        caption_clips(clips, str(root), CaptionConfig(mode="mllm"), str(tmp_path), progress=False)
    assert not (tmp_path / schema.CAPTIONS_FILE).exists()
    assert CaptionConfig.from_env().mode == "dataset"  # no endpoint -> the embedded default
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    assert CaptionConfig.from_env().mode == "mllm"


def test_resume_after_killed_run_asks_only_for_the_rest(data, tmp_path):
    root, clips, _ = data
    clip_file = tmp_path / "clips.parquet"
    import pyarrow.parquet as pq
    pq.write_table(clips, clip_file)
    k = 3
    out = tmp_path / "out"
    with FakeOpenAI(hang_s=60) as srv:
        srv.rule = lambda images: "hang" if srv.answered >= k else None  # the (k+1)-th request never returns
        env = dict(os.environ, PYTHONPATH=str(REPO), OPENAI_BASE_URL=srv.base_url)
        proc = subprocess.Popen([sys.executable, "-m", "captions", "clips", "--out", str(out), "--dataroot",
                                 str(root), "--clips", str(clip_file), "--model", "test-vlm", "--concurrency", "1",
                                 "--tile-width", str(TILE), "--flush-every", "1", "--quiet"], env=env, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        parts = out / (schema.CAPTIONS_FILE + ".parts")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (srv.requests > k and len(list(parts.glob("*.parquet"))) >= k):
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        assert srv.answered == k and len(list(parts.glob("*.parquet"))) == k
        srv.rule = None
        srv.reset_counts()
        res = caption_clips(clips, str(root), mllm_cfg(srv), str(out), progress=False)
        assert srv.requests == clips.num_rows - k      # only the rest
        assert res.cached == k and len(res.captions) == clips.num_rows
    assert not parts.exists()                           # compacted into the table
    assert read_captions(str(out / schema.CAPTIONS_FILE)).num_rows == clips.num_rows


def test_cli_clips_writes_table_and_quarantine(data, tmp_path, capsys):
    from captions.cli import main
    root, clips, _ = data
    import pyarrow.parquet as pq
    (tmp_path / schema.WORK_DIR).mkdir()
    pq.write_table(clips, tmp_path / schema.CLIP_INDEX_FILE)
    with FakeOpenAI() as srv:
        bad = clips.column("middle_frame_paths")[1].as_py()[0]
        os.rename(root / bad, root / (bad + ".bak"))  # one clip's image is missing
        try:
            rc = main(["clips", "--out", str(tmp_path), "--dataroot", str(root), "--mode", "mllm", "--base-url",
                       srv.base_url, "--model", "test-vlm", "--quiet", "--max-retries", "1"])
        finally:
            os.rename(root / (bad + ".bak"), root / bad)
    assert rc == 0
    assert "6 clips" in capsys.readouterr().out
    from pipeline.contract.manifest import read_quarantine
    q = read_quarantine(str(tmp_path))
    assert [(r.stage, r.item, r.reason) for r in q] == [("captions", clips.column("key")[1].as_py(),
                                                         "unreadable_image")]
    assert read_captions(str(tmp_path / schema.CAPTIONS_FILE)).num_rows == 5
