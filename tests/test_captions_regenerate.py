"""Re-captioning shards: only caption.txt and meta.json['caption'] change, everything else is
copied byte for byte, the manifest follows, and the samples still decode."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from captions.config import CaptionConfig, CaptionConfigError
from captions.regenerate import recaption_shards
from pipeline.contract import schema
from pipeline.contract.manifest import read_manifest, read_quarantine
from pipeline.contract.shardio import iter_shard, sha256_file
from tests.factories_captions import write_shards_with_frames
from tests.openai_server import FakeOpenAI

BUCKET = {(64, 128, 9): 6}  # 2 shards (4 + 2 samples)


def tar_layout(path: Path) -> list[tuple]:
    with tarfile.open(path) as t:
        return [(m.name, m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) for m in t.getmembers()]


def snapshot(out: Path) -> dict[str, dict[str, dict[str, bytes]]]:
    return {str(p.relative_to(out)): dict(iter_shard(p)) for p in sorted(out.rglob("*.tar"))}


@pytest.fixture
def built(tmp_path):
    out, root = tmp_path / "out", tmp_path / "nusc"
    records = write_shards_with_frames(out, root, BUCKET)
    return out, root, records


def test_recaption_rewrites_only_caption_members(built):
    out, root, records = built
    before = snapshot(out)
    layout_before = {r.path: tar_layout(out / r.path) for r in records}
    with FakeOpenAI() as srv:
        cfg = CaptionConfig(mode="mllm", base_url=srv.base_url, model=srv.model, tile_width=128,
                            prompt_version="v0-brief", backoff_base_s=0.01)
        res = recaption_shards(str(out), cfg, str(root), progress=False)
        assert srv.errors == [] and srv.requests == 6
        assert res.shards == 2 and res.shards_rewritten == 2 and res.samples_updated == 6
        after = snapshot(out)
        for shard, samples in before.items():
            assert list(after[shard]) == list(samples)  # same keys, same order
            for key, members in samples.items():
                new = after[shard][key]
                assert list(new) == list(members)  # same members, same order
                for name, data in members.items():
                    if name not in ("caption.txt", "meta.json"):
                        assert new[name] == data, (key, name)  # byte for byte
                old_meta, new_meta = json.loads(members["meta.json"]), json.loads(new["meta.json"])
                assert new_meta["caption"] == {"source": "mllm", "prompt_version": "v0-brief", "model": "test-vlm"}
                assert {k: v for k, v in new_meta.items() if k != "caption"} == \
                       {k: v for k, v in old_meta.items() if k != "caption"}
                assert new["meta.json"] == schema.meta_bytes(new_meta)  # canonical JSON
                assert new["caption.txt"].decode() == res.captions.captions[key][0]
                assert new["caption.txt"] != members["caption.txt"]
                sample = schema.decode_sample(new, key)
                assert sample.caption.startswith("An overcast urban street")
        # tar headers other than sizes are unchanged
        for r in read_manifest(str(out), "train"):
            assert [row[0:1] + row[2:] for row in tar_layout(out / r.path)] == \
                   [row[0:1] + row[2:] for row in layout_before[r.path]]
            assert r.sha256 == sha256_file(out / r.path) and r.bytes == (out / r.path).stat().st_size
            assert r.keys == next(x for x in records if x.path == r.path).keys
        # a second run: all cached, no shard changes
        srv.reset_counts()
        again = recaption_shards(str(out), cfg, str(root), progress=False)
        assert srv.requests == 0 and again.shards_rewritten == 0
        assert snapshot(out) == after


def test_failed_sample_keeps_its_caption_and_corrupt_shard_is_left_alone(built):
    out, root, records = built
    first, second = sorted(records, key=lambda r: r.path)
    with open(out / second.path, "r+b") as f:  # bytes no longer match the manifest row
        f.seek(600)
        f.write(b"X")
    damaged = (out / second.path).read_bytes()
    before = snapshot(out)
    with FakeOpenAI() as srv:
        srv.plan = ["500"] * 2  # the first request fails on both attempts
        cfg = CaptionConfig(mode="mllm", base_url=srv.base_url, model=srv.model, tile_width=128,
                            concurrency=1, max_retries=1, backoff_base_s=0.01)
        res = recaption_shards(str(out), cfg, str(root), progress=False)
    assert (out / second.path).read_bytes() == damaged
    reasons = sorted((q.reason, q.item) for q in read_quarantine(str(out)))
    failed_key = next(q.item for q in res.quarantine if q.reason == "server_error")
    assert reasons == sorted([("sha256_mismatch", second.path), ("server_error", failed_key)])
    after = snapshot(out)[first.path]
    for key, members in before[first.path].items():
        if key == failed_key:
            assert after[key] == members
        else:
            assert after[key]["caption.txt"] != members["caption.txt"]
    assert read_manifest(str(out), "train")[0].sha256 == sha256_file(out / first.path)


def test_mode_none_and_dataroot_required(built):
    out, root, _ = built
    with pytest.raises(CaptionConfigError, match="--dataroot"):
        recaption_shards(str(out), CaptionConfig(mode="dataset"), None, progress=False)
    res = recaption_shards(str(out), CaptionConfig(mode="none"), None, progress=False)
    assert res.shards_rewritten == 2
    for samples in snapshot(out).values():
        for key, members in samples.items():
            s = schema.decode_sample(members, key)
            assert s.caption == "" and s.meta["caption"]["source"] == "none"
