"""Readers that just work, on a real demo build (`--config demo`, real Ray, the tiny CogVAE), exactly as
docs/dataset.md shows them: each ```python block starting with `# reader: NAME` runs here with only the output
folder changed. Also on that build: the card's numpy-only snippet against decode_sample for every member of
every shard, and a rebuild with nothing to do answering without Ray."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.build import nothing_to_do, parse_args, run_build
from pipeline.contract import schema
from pipeline.contract.manifest import read_manifest
from pipeline.contract.shardio import iter_shard
from test_card import assert_snippet_decodes_like_the_contract

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "dataset.md"
BUCKET = "64x128_t9"


def build_args(data, vae, out) -> list[str]:
    return ["--config", "demo", "--dataroot", str(data.root), "--version", data.version, "--out", str(out),
            "--vae", str(vae), "--captions", "dataset", "--no-progress", "--encode-cpus", "0.5"]


@pytest.fixture(scope="module")
def demo(ray_local, synth_dataset, tmp_path_factory):
    from pipeline.shards.vae import write_tiny_vae
    vae = write_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-cogvae")
    out = tmp_path_factory.mktemp("demo") / "shards"
    summary = run_build(parse_args(build_args(synth_dataset, vae, out)))
    assert summary.complete and summary.shards_written == summary.shards_total > 0
    return out, vae


def decoded(out: Path, split: str = "train", bucket: str | None = None) -> dict[str, schema.Sample]:
    return {k: schema.decode_sample(m, key=k) for r in read_manifest(str(out), split)
            if bucket is None or r.bucket == bucket for k, m in iter_shard(out / r.path)}


def run_doc_block(name: str, out: Path) -> dict:
    """Execute the docs' block `# reader: NAME` with demo_out/shards replaced by this build's folder."""
    blocks = re.findall(r"```python\n(# reader: (\w+)\n.*?)```", DOC.read_text(), re.S)
    code = {n: b for b, n in blocks}
    assert name in code, f"docs/dataset.md has no '# reader: {name}' block (has {sorted(code)})"
    ns: dict = {}
    exec(compile(code[name].replace("demo_out/shards", str(out)), f"docs/dataset.md:{name}", "exec"), ns)  # noqa: S102
    return ns


def assert_same(got: np.ndarray, want: np.ndarray, what: str) -> None:
    got = np.asarray(got)
    assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), what


def test_every_member_of_every_demo_shard_decodes_from_the_card_alone(demo):
    out, _ = demo
    card = (out / schema.DATASET_CARD_FILE).read_text()
    shards = sorted(out.glob("*/*/shard-*.tar"))
    n = sum(assert_snippet_decodes_like_the_contract(card, p) for p in shards)
    info = json.loads((out / schema.DATASET_INFO_FILE).read_text())
    assert n == info["total_samples"] > 0 and len(shards) == sum(
        v["shards"] for per in info["splits"].values() for v in per.values())
    assert set(info["buckets"]) == {r.bucket for s in ("train", "val") for r in read_manifest(str(out), s)}


def test_huggingface_datasets_gives_one_bucket_with_float16_latents(demo):
    out, _ = demo
    ns = run_doc_block("huggingface", out)
    ds = ns["ds"]
    splits = {r.split for s in ("train", "val") for r in read_manifest(str(out), s) if r.bucket == BUCKET}
    assert set(ds) == splits
    for split in splits:
        want = decoded(out, split, BUCKET)
        assert sorted(ds[split]["__key__"]) == sorted(want)  # this bucket only, every sample once
    assert ns["latent"].dtype == np.float16 and ns["latent"].shape == (6, 16, 3, 8, 16)
    x = ns["x"]
    s = decoded(out, "train", BUCKET)[x["__key__"]]
    for name in schema.ARRAY_FIELDS:
        if getattr(s, name) is not None:
            assert_same(x[f"{name}.npy"], getattr(s, name), name)
    assert x["caption.txt"] == s.caption and x["meta.json"]["bev"] == s.meta["bev"]


def test_webdataset_batches_with_the_padding_collate(demo):
    out, _ = demo
    ns = run_doc_block("webdataset", out)
    batch, want = ns["batch"], decoded(out, "train", BUCKET)
    keys = batch["__key__"]
    n_max = max(want[k].box_class.shape[0] for k in keys)
    assert ns["boxes"].shape == (4, 9, 6, n_max, 7)
    assert len({want[k].box_class.shape[0] for k in sorted(want)}) > 1, "the demo's N never varies: no padding shown"
    for i, k in enumerate(keys):
        n = want[k].box_class.shape[0]
        assert_same(batch["view_boxes.npy"][i, :, :, :n], want[k].view_boxes, k)
        assert not batch["box_mask.npy"][i, :, n:].any() and (batch["box_class.npy"][i, n:] == -1).all()
        assert_same(batch["latent_mean.npy"][i], want[k].latent_mean, k)


def test_ray_data_reads_a_split_folder(demo):
    out, _ = demo
    ns = run_doc_block("ray", out)
    want = decoded(out, "train")
    assert sorted(r["__key__"] for r in ns["rows"]) == sorted(want)
    assert ns["latent"].dtype == np.float16
    r = ns["rows"][0]
    assert_same(r["view_boxes.npy"], want[r["__key__"]].view_boxes, r["__key__"])


def test_torch_iterable_dataset_reads_every_sample_once(demo):
    out, _ = demo
    ns = run_doc_block("torch", out)
    want = decoded(out, "train", BUCKET)
    keys = [k for b in ns["batches"] for k in b["key"]]
    assert sorted(keys) == sorted(want)   # two workers, disjoint shards, nothing twice
    assert ns["latent"].dtype.is_floating_point and str(ns["latent"].dtype) == "torch.float16"
    b = ns["batches"][0]
    for i, k in enumerate(b["key"]):
        n = want[k].box_class.shape[0]
        assert_same(b["view_boxes"][i, :, :, :n].numpy(), want[k].view_boxes, k)
        assert not b["box_mask"][i, :, n:].any()


def test_a_rebuild_with_nothing_to_do_answers_without_ray(demo, synth_dataset, tmp_path):
    out, vae = demo
    code = ("import sys\nfrom pipeline.build import main\nrc = main(sys.argv[1:])\n"
            "print('RAY_IMPORTED', 'ray' in sys.modules)\nsys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-c", code, *build_args(synth_dataset, vae, out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "MDV2_DEBUG": ""})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "RAY_IMPORTED False" in r.stdout and "0 written" in r.stdout and "noop_check" in r.stdout, r.stdout
    cfg = parse_args(build_args(synth_dataset, vae, out))
    assert nothing_to_do(cfg) is not None
    assert nothing_to_do(parse_args(build_args(synth_dataset, vae, out) + ["--samples-per-shard", "3"])) is None
    table = Path(synth_dataset.root) / synth_dataset.version / "scene.json"
    st = table.stat()
    try:
        os.utime(table, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))   # a changed table: build again
        assert nothing_to_do(cfg) is None
    finally:
        os.utime(table, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert nothing_to_do(cfg) is not None
    shard = next(out.glob("train/*/shard-*.tar"))
    moved = tmp_path / "away.tar"
    shard.rename(moved)                                                       # a planned shard missing
    try:
        assert nothing_to_do(cfg) is None
    finally:
        moved.rename(shard)
