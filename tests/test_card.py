"""The dataset card and info.json (pipeline/shards/card.py): what a stranger needs, generated from the contract.

On factory shards (no Ray): the YAML front matter, the member/meta tables, info.json's shapes against real
arrays, the card's numpy-only snippet against decode_sample for every member, the rewrite after re-captioning
and after mdv2-stats. The same snippet test on a real demo build is in tests/test_readers.py."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from factories_card import BUILD, write_output
from pipeline.contract import geometry, schema
from pipeline.contract.shardio import iter_shard
from pipeline.shards.card import SNIPPET_HEADING, caption_sources, refresh_card, write_card
from pipeline.shards.cardinfo import META_DOC, hf_features

BUCKETS = {(64, 128, 9): 3, (64, 128, 1): 2}


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("card")
    write_output(out, BUCKETS, num_boxes=3)
    return out


def front_matter(card: str) -> dict:
    assert card.startswith("---\n"), "no YAML front matter: Hugging Face warns 'Repo card metadata block was not found'"
    return yaml.safe_load(card.split("---\n", 2)[1])


def card_snippet(card: str) -> str:
    """The card's decoding snippet: the ```python block under its heading."""
    m = re.search(re.escape(SNIPPET_HEADING) + r"\n```python\n(.*?)\n```", card, re.S)
    assert m, "the card has no decoding snippet"
    return m.group(1)


def assert_snippet_decodes_like_the_contract(card: str, shard: Path) -> int:
    """Run the card's snippet (and nothing of this code base) on a shard; every member of every sample must
    equal schema.decode_sample's, dtype and shape included. Returns the number of samples compared."""
    ns: dict = {}
    exec(compile(card_snippet(card), "card-snippet", "exec"), ns)  # noqa: S102  the card's own code
    ours = {k: schema.decode_sample(m, key=k) for k, m in iter_shard(shard)}
    theirs = dict(ns["read_shard"](str(shard)))
    assert list(theirs) == list(ours)
    for key, members in theirs.items():
        s = ours[key]
        expected = {f"{n}.npy": getattr(s, n) for n in schema.ARRAY_FIELDS if getattr(s, n) is not None}
        expected.update({"meta.json": s.meta, "caption.txt": s.caption})
        assert sorted(members) == sorted(expected), key
        for name, value in expected.items():
            got = members[name]
            if isinstance(value, np.ndarray):
                assert got.dtype == value.dtype and got.shape == value.shape, (key, name)
                assert np.array_equal(got, value), (key, name)
            else:
                assert got == value, (key, name)
        assert np.array_equal(ns["bev_masks"](members), s.bev_masks()), key
        z = ns["latents"](members, np.random.default_rng(0))
        assert z.shape == s.latent_mean.shape and z.dtype == np.float32
    return len(theirs)


def test_front_matter_has_license_tags_and_one_config_per_bucket(out):
    card = (out / schema.DATASET_CARD_FILE).read_text()
    fm = front_matter(card)
    assert fm["license"] == "apache-2.0"  # v1.0-synth: this project's generator; nuScenes gets cc-by-nc-sa-4.0
    assert "autonomous-driving" in fm["tags"] and "webdataset" in fm["tags"]
    configs = {c["config_name"]: c["data_files"] for c in fm["configs"]}
    assert configs == {b: [{"split": s, "path": f"{s}/{b}/*.tar"} for s in ("train", "val")]
                       for b in ("64x128_t1", "64x128_t9")}
    infos = {i["config_name"]: {f["name"]: f for f in i["features"]} for i in fm["dataset_info"]}
    lat = infos["64x128_t9"]["latent_mean.npy"]["dtype"]["array5_d"]
    assert lat == {"shape": [6, 16, 3, 8, 16], "dtype": "float16"}  # float16 stays float16
    assert infos["64x128_t1"]["bev.npy"]["dtype"]["array4_d"] == {"shape": [1, 8, 200, 25], "dtype": "uint8"}
    # N varies per sample: nested lists, the fixed lengths kept
    assert infos["64x128_t9"]["view_boxes.npy"] == {"name": "view_boxes.npy", "length": 9, "list": {
        "length": 6, "list": {"list": {"list": "float32", "length": 7}}}}
    assert set(infos["64x128_t9"]) == {"__key__", "__url__", *schema.MEMBER_NAMES}


def test_hf_features_are_valid_datasets_features():
    """The YAML is what datasets itself writes for these features (Features._to_yaml_list round trip)."""
    import datasets  # the test extra installs it (pyproject.toml)
    yml = hf_features(424, 800, 17)
    feats = datasets.Features._from_yaml_list(yml)
    assert feats._to_yaml_list() == yml
    assert feats["bev.npy"].shape == (17, 8, 400, 50)  # the large grid from height 424 (schema.bev_grid)
    assert feats["latent_mean.npy"].dtype == "float16"


def test_card_says_every_member_with_axes_units_and_frames(out):
    card = (out / schema.DATASET_CARD_FILE).read_text()
    info = json.loads((out / schema.DATASET_INFO_FILE).read_text())
    for m in schema.MEMBERS:
        row = next(line for line in card.splitlines() if line.startswith(f"| `{m.name}` |"))
        if m.dtype:
            assert m.dtype in row and all(a in row for a in m.axes), row
            assert m.axes and len(m.axes) == len(m.shape(dict(V=6, T=9, Tl=3, N=2, H=64, W=128, G=200))), m.name
    for word in ("LiDAR(t): x right, y forward, z up", "pinhole", "numpy.packbits", "bit order big",
                 "100 m x", "400 x 400 cells of 0.25 m", "x right, y down, z forward", "car", "road_divider"):
        assert word in card, word
    assert "META_FIELDS" not in card and "OBJECT_CLASSES" not in card  # names in the code say nothing to a reader
    assert info["schema_version"] == schema.SCHEMA_VERSION and info["codebase_version"] == schema.PIPELINE_VERSION
    assert info["object_classes"] == list(schema.OBJECT_CLASSES) and info["map_classes"] == list(schema.MAP_CLASSES)


def test_meta_table_covers_exactly_the_contracts_meta_fields(out):
    assert list(META_DOC) == list(schema.META_FIELDS)
    for _, members in iter_shard(next(out.glob("train/*/shard-*.tar"))):
        assert set(json.loads(members["meta.json"])) == set(META_DOC)


def test_info_json_shapes_match_the_arrays(out):
    info = json.loads((out / schema.DATASET_INFO_FILE).read_text())
    for shard in sorted(out.glob("*/*/shard-*.tar")):
        bucket = info["buckets"][shard.parent.name]
        for key, members in iter_shard(shard):
            s = schema.decode_sample(members, key=key)
            for name in schema.ARRAY_FIELDS:
                arr, f = getattr(s, name), bucket["features"][f"{name}.npy"]
                assert f["dtype"] == str(arr.dtype) and len(f["names"]) == arr.ndim
                assert [n if n is not None else arr.shape[i] for i, n in enumerate(f["shape"])] == list(arr.shape)
                assert (None in f["shape"]) == ("N object" in schema.MEMBERS[schema.MEMBER_NAMES.index(
                    f"{name}.npy")].axes)  # only N varies
    assert info["splits"]["train"]["64x128_t9"]["samples"] == 3 and info["total_samples"] == 10


def test_snippet_decodes_every_member_like_decode_sample(out):
    card = (out / schema.DATASET_CARD_FILE).read_text()
    n = sum(assert_snippet_decodes_like_the_contract(card, p) for p in sorted(out.glob("*/*/shard-*.tar")))
    assert n == 10


def test_snippet_fails_on_a_wrong_bit_order(out, tmp_path):
    """The check can fail: the snippet with little-endian unpacking disagrees with the contract (on a map whose
    edges are not byte-aligned, where the bit order shows)."""
    from factories import make_sample
    from pipeline.contract.shardio import write_shard
    s = make_sample(num_frames=1)
    masks = np.zeros((1, 8, 200, 200), bool)
    masks[:, 1, :, 81:117] = True
    s["bev"] = schema.pack_bev(masks)
    write_shard(tmp_path / "shard-000000.tar", [(s["key"], schema.encode_sample(s))])
    card = (out / schema.DATASET_CARD_FILE).read_text()
    assert assert_snippet_decodes_like_the_contract(card, tmp_path / "shard-000000.tar") == 1
    broken = card.replace('axis=-1, count=sample["meta.json"]["bev"]["cells"])',
                          'axis=-1, count=sample["meta.json"]["bev"]["cells"], bitorder="little")')
    assert broken != card
    with pytest.raises(AssertionError):
        assert_snippet_decodes_like_the_contract(broken, tmp_path / "shard-000000.tar")


def test_snippet_projection_follows_the_stated_camera_model():
    """Known pinhole: a point 10 m straight ahead lands on the principal point, 1 m right of it fx / 10 px right."""
    ns: dict = {}
    exec(compile(card_snippet(write_card_text()), "card-snippet", "exec"), ns)  # noqa: S102
    k = np.array([[500.0, 0, 64], [0, 500.0, 32], [0, 0, 1]], np.float32)
    cam2lidar = np.eye(4, dtype=np.float32)
    cam2lidar[:3, :3] = [[1, 0, 0], [0, 0, 1], [0, -1, 0]]   # camera x right, y down, z forward in LiDAR x, -z, y
    cam2lidar[:3, 3] = [0, 1.0, 0]
    sample = {"cam2lidar.npy": cam2lidar[None, None], "intrinsics.npy": k[None]}
    uv, depth = ns["project"](sample, 0, 0, np.array([[0, 11.0, 0], [1, 11.0, 0], [0, 11.0, 1]]))
    assert np.allclose(uv, [[64, 32], [114, 32], [64, -18]]) and np.allclose(depth, 10)
    ours, _ = geometry.project(geometry.transform_points(geometry.invert_transform(cam2lidar),
                                                        np.array([[1, 11.0, 0]])), k)
    assert np.allclose(uv[1], ours[0])


def write_card_text() -> str:
    from pipeline.shards.card import render
    from pipeline.shards.cardinfo import dataset_info
    return render(dataset_info([], BUILD, 0))


def test_recaptioning_rewrites_the_card_with_the_real_caption_source(tmp_path):
    from captions.config import CaptionConfig
    from captions.regenerate import recaption_shards
    from factories_captions import write_shards_with_frames
    from openai_server import FakeOpenAI
    out, root = tmp_path / "out", tmp_path / "nusc"
    records = write_shards_with_frames(out, root, {(64, 128, 9): 6})
    write_card(str(out), records, 0, BUILD)
    assert "captions: dataset: 6 samples" in (out / schema.DATASET_CARD_FILE).read_text()
    with FakeOpenAI() as srv:
        cfg = CaptionConfig(mode="mllm", base_url=srv.base_url, model=srv.model, tile_width=128,
                            prompt_version="v0-brief", backoff_base_s=0.01)
        recaption_shards(str(out), cfg, str(root), progress=False)
    card = (out / schema.DATASET_CARD_FILE).read_text()
    assert "captions: mllm (model test-vlm, prompt_version v0-brief): 6 samples" in card, card[:2000]
    info = json.loads((out / schema.DATASET_INFO_FILE).read_text())
    assert info["captions"] == [{"source": "mllm", "model": "test-vlm", "prompt_version": "v0-brief", "samples": 6}]
    assert info["buckets"]["64x128_t9"]["splits"]["train"]["samples"] == 6


def test_stats_rewrite_the_card(out, tmp_path, capsys):
    from pipeline.tools.stats import main as stats_main
    import shutil
    mine = tmp_path / "out"
    shutil.copytree(out, mine)
    assert "Not computed yet" in (mine / schema.DATASET_CARD_FILE).read_text()
    assert stats_main([str(mine), "--no-progress"]) == 0
    card = (mine / schema.DATASET_CARD_FILE).read_text()
    info = json.loads((mine / schema.DATASET_INFO_FILE).read_text())
    assert "From `mdv2-stats`" in card and "10 samples read" in card
    assert info["stats"]["samples_read"] == 10 and info["build"] == json.loads(
        (out / schema.DATASET_INFO_FILE).read_text())["build"]  # what the build knew survives the refresh
    assert "BEV coverage" not in card  # mdv2-stats computes none; the card promises only what it writes


def test_refresh_without_info_json_does_nothing(tmp_path):
    assert refresh_card(str(tmp_path)) is None and not (tmp_path / schema.DATASET_CARD_FILE).exists()


def test_caption_sources_count_each_source_model_and_prompt():
    metas = [{"caption": {"source": "mllm", "model": "m", "prompt_version": "v1"}}] * 2 + \
            [{"caption": {"source": "dataset", "model": None, "prompt_version": None}}]
    assert caption_sources(metas) == [{"source": "dataset", "model": None, "prompt_version": None, "samples": 1},
                                      {"source": "mllm", "model": "m", "prompt_version": "v1", "samples": 2}]
