"""Text path: tiny T5 folder save/load (local only), caption cache round trip, CLI, and the
cached states driving the model."""
from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from model.conditions import random_conditions
from model.registry import build_model
from model.text import (T5TextEncoder, TextEmbeddingCache, caption_hash, main, prepare_text_embeddings,
                        write_tiny_t5)
from pipeline.contract import schema

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return write_tiny_t5(tmp_path_factory.mktemp("t5") / "tiny-t5")


def test_caption_hash_is_sha256_of_utf8():
    assert caption_hash("Rainy night, ünïcode") == hashlib.sha256("Rainy night, ünïcode".encode()).hexdigest()


def test_tiny_t5_loads_locally_and_encodes(t5_dir):
    enc = T5TextEncoder(t5_dir, max_length=16)
    emb, mask = enc.encode(["a car", "a long caption that will be truncated at sixteen bytes"])
    assert emb.shape == (2, 16, enc.dim) and mask.dtype == torch.bool
    assert mask[0].sum() == len("a car") + 1 and mask[1].all()            # bytes + </s>
    assert emb[0, ~mask[0]].abs().sum() > 0 and emb[0, mask[0]].abs().sum() > 0   # padding states too (theirs)
    again, _ = T5TextEncoder(t5_dir, max_length=16).encode(["a car"])
    assert torch.equal(again[0], emb[0])                                   # deterministic reload
    with pytest.raises(FileNotFoundError, match="config.json"):
        T5TextEncoder(t5_dir.parent / "missing")


def test_cache_round_trip_encodes_each_caption_once(t5_dir, tmp_path):
    enc = T5TextEncoder(t5_dir, max_length=24)
    calls = []
    orig = enc.encode
    enc.encode = lambda texts: (calls.extend(texts), orig(texts))[1]       # count, keep the real encoder
    texts = ["sunny day", "night, rain", "sunny day", "crowded intersection"]
    extra = len(schema.OBJECT_CLASSES) + 1                                  # class names and "" come along
    cache = TextEmbeddingCache(tmp_path / "cache")
    assert cache.build(texts, enc, batch_size=2, shard_size=2, progress=False) == 3 + extra
    assert sorted(calls) == sorted(set(texts) | set(schema.OBJECT_CLASSES) | {""})
    reopened = TextEmbeddingCache(tmp_path / "cache")
    stored = len("crowded intersection") + 2                                # longest caption + </s> + 1 state
    assert len(reopened) == 3 + extra and reopened.meta["dim"] == enc.dim and reopened.meta["stored"] == stored
    ref, ref_mask = orig(["night, rain"])
    emb, mask = reopened.get("night, rain")
    assert emb.shape == (stored, enc.dim) and torch.equal(mask, ref_mask[0, :stored])
    torch.testing.assert_close(emb, ref[0, :stored], atol=2e-3, rtol=2e-3)  # float16 storage, padding states kept
    assert reopened.build(texts + ["new one"], enc, progress=False) == 1  # incremental
    with pytest.raises(ValueError, match="new cache"):                    # longer than the stored states
        reopened.build(["a caption much longer than every other one"], enc, progress=False)
    with pytest.raises(KeyError, match="not in the text cache"):
        reopened.get("never seen")
    emb_b, mask_b = reopened.get_batch(["sunny day", "new one"])
    assert emb_b.shape == (2, stored, enc.dim)
    # cached states condition the model (text_dim of tiny = tiny T5 width)
    model = build_model("tiny", text_dim=enc.dim).eval()
    cond = random_conditions(2, 2, 1, text_len=stored, text_dim=enc.dim, bev_size=16)
    cond.text, cond.text_mask = emb_b, mask_b
    with torch.no_grad():
        assert model(torch.randn(2, 2, 16, 1, 2, 2), torch.rand(2), cond).shape == (2, 2, 16, 1, 2, 2)


def test_cli_builds_cache_from_caption_table(t5_dir, tmp_path):
    table = tmp_path / "captions.parquet"
    pq.write_table(pa.table({"key": ["a", "b", "c"], "text": ["one", "two", None]}), table)
    out = tmp_path / "cache"
    assert main(["build", "--t5", str(t5_dir), "--captions", str(table), "--out", str(out),
                 "--max-length", "8"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert set(index["entries"]) == {caption_hash(t) for t in ("one", "two", "", *schema.OBJECT_CLASSES)}
    first = (out / index["entries"][caption_hash("one")]).read_bytes()
    out2 = tmp_path / "cache2"
    main(["build", "--t5", str(t5_dir), "--captions", str(table), "--out", str(out2), "--max-length", "8"])
    assert (out2 / index["entries"][caption_hash("one")]).read_bytes() == first   # deterministic bytes
    with pytest.raises(ValueError, match="max_length"):
        TextEmbeddingCache(out).build(["x"], T5TextEncoder(t5_dir, max_length=9), progress=False)


def test_class_tokens_and_base_token_from_t5(t5_dir, tmp_path):
    """Their prepare_text_embedding: class token i = mean over the name's real tokens of y_proj(T5(name)),
    base_token = y_proj(T5(""))."""
    enc = T5TextEncoder(t5_dir, max_length=16)
    cache = TextEmbeddingCache(tmp_path / "c")
    cache.build(["x"], enc, progress=False)
    model = build_model("tiny", text_dim=enc.dim)
    prepare_text_embeddings(model, cache.get_batch)
    states, mask = enc.encode(["truck", ""])
    with torch.no_grad():
        y = model.y_embedder.y_proj(states)
    torch.testing.assert_close(model.bbox_embedder._class_tokens[1], y[0, : int(mask[0].sum())].mean(0),
                               atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(model.base_token, y[1, 0], atol=2e-3, rtol=2e-3)
