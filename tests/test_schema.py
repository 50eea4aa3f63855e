"""The sample contract: round trips, and a test for every rejection path."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pipeline.contract import schema
from pipeline.contract.schema import SchemaError, decode_sample, encode_sample
from pipeline.contract.shardio import iter_shard, tar_bytes
from factories import make_sample


def _roundtrip(d):
    members = encode_sample(d)
    return members, decode_sample(members, d["key"])


def test_roundtrip_preserves_every_member():
    d = make_sample()
    members, s = _roundtrip(d)
    assert list(members) == [m for m in schema.MEMBER_NAMES if m in members]  # fixed order
    for name in schema.ARRAY_FIELDS:
        np.testing.assert_array_equal(getattr(s, name), d[name])
        assert getattr(s, name).dtype == d[name].dtype
    assert s.meta == d["meta"] and s.caption == d["caption"] and s.key == d["key"]
    assert s.bev_masks().shape == (9, 8, 200, 200)


@pytest.mark.parametrize("height,width,cells,cell_m", [(64, 128, 200, 0.5), (224, 400, 200, 0.5),
                                                       (424, 800, 400, 0.25), (848, 1600, 400, 0.25)])
def test_bev_grid_follows_the_bucket_height(height, width, cells, cell_m):
    """The authors' rule: 200 x 0.5 m below 424 rows, 400 x 0.25 m from 424 up; both 100 m wide, and a
    sample of that bucket round-trips its filled view-frames and source camera."""
    assert schema.bev_grid(height) == (cells, cell_m) and cells * cell_m == schema.BEV_EXTENT_M
    if height > 424:
        return  # the 848x1600 latents are 8 MB per view: the grid rule is what differs
    d = make_sample(height=height, width=width, num_frames=5, num_boxes=2, filled=((1, 4), (2, 0)))
    assert d["bev"].shape == (5, 8, cells, cells // 8)
    _, s = _roundtrip(d)
    assert s.meta["bev"] == {"cells": cells, "cell_m": cell_m} and s.bev_masks().shape == (5, 8, cells, cells)
    assert s.meta["filled"] == [[1, 4], [2, 0]] and np.argwhere(s.fill_mask).tolist() == [[1, 4], [2, 0]]
    assert s.source_intrinsics.shape == (6, 3, 3) and s.meta["source_size"] == [[1600, 900]] * 6


@settings(max_examples=25, deadline=None)
@given(t=st.sampled_from([1, 9, 17, 33]), v=st.integers(1, 6), n=st.integers(0, 7),
       hw=st.sampled_from([(64, 128), (80, 144), (16, 24)]), std=st.booleans(), seed=st.integers(0, 10_000),
       caption=st.text(max_size=40))
def test_roundtrip_property(t, v, n, hw, std, seed, caption):
    d = make_sample(num_frames=t, views=schema.VIEWS[:v], num_boxes=n, height=hw[0], width=hw[1],
                    with_std=std, seed=seed, caption=caption)
    members, s = _roundtrip(d)
    assert s.latent_mean.shape == (v, 16, schema.latent_frames(t), hw[0] // 8, hw[1] // 8)
    assert (s.latent_std is not None) == std
    assert s.caption == caption
    assert encode_sample(s) == members  # Sample -> bytes is stable


def test_encoding_is_byte_deterministic():
    assert encode_sample(make_sample(seed=3)) == encode_sample(make_sample(seed=3))
    a = tar_bytes([("k1", encode_sample(make_sample(seed=1)))])
    b = tar_bytes([("k1", encode_sample(make_sample(seed=1)))])
    assert a == b


def test_tar_roundtrip_through_webdataset(tmp_path):
    import webdataset as wds
    d = make_sample()
    path = tmp_path / "s.tar"
    path.write_bytes(tar_bytes([(d["key"], encode_sample(d))]))
    (key, members), = list(iter_shard(path))
    assert key == d["key"] and set(members) == set(encode_sample(d))
    (wsample,) = list(wds.WebDataset(str(path), shardshuffle=False))
    s = decode_sample(wsample)
    assert s.key == d["key"]
    np.testing.assert_array_equal(s.boxes, d["boxes"])


def _meta(**changes):
    d = make_sample()
    d["meta"] = {**d["meta"], **changes}
    return d


def _with(name, value):
    d = make_sample()
    d[name] = value
    return d


LAT = make_sample()["latent_mean"]
REJECTIONS = [
    # (description, sample, member, phrase in message)
    ("T not 4k+1", _meta(num_frames=8), "meta.json", "4k+1"),
    ("T zero", _meta(num_frames=0), "meta.json", "4k+1"),
    ("schema major mismatch", _meta(schema_version="4.0"), "meta.json", "major version 4"),
    ("schema 1.x shard", _meta(schema_version="1.0"), "meta.json", "rebuild the shards"),
    ("schema 2.x shard", _meta(schema_version="2.0"), "meta.json", "rebuild the shards"),
    ("view timestamps not T x V", _meta(view_timestamps_us=[[0]] * 9), "meta.json", "view_timestamps_us must be"),
    ("garbage schema version", _meta(schema_version="latest"), "meta.json", "MAJOR.MINOR"),
    ("missing meta field", {**make_sample(), "meta": {k: v for k, v in make_sample()["meta"].items() if k != "split"}},
     "meta.json", "missing field 'split'"),
    ("wrong meta type", _meta(height="64"), "meta.json", "'height' must be"),
    ("height not /8", _meta(height=60), "meta.json", "multiples of 8"),
    ("timestamps wrong length", _meta(timestamps_us=[0]), "meta.json", "timestamps_us"),
    ("frames not T x V", _meta(frames=[["a"]] * 9), "meta.json", "T x V"),
    ("bad latent kind", _meta(latent="sample"), "meta.json", "latent must be"),
    ("vae fields missing", _meta(vae={"name": "x"}), "meta.json", "vae is missing"),
    ("duplicate views", _meta(views=["CAM_FRONT"] * 6), "meta.json", "distinct"),
    ("latent wrong dtype", _with("latent_mean", LAT.astype(np.float32)), "latent_mean.npy", "dtype float32"),
    ("latent wrong shape", _with("latent_mean", LAT[:, :, :2]), "latent_mean.npy", "shape"),
    ("NaN latents", _with("latent_mean", np.where(np.arange(LAT.size).reshape(LAT.shape) == 5, np.nan, LAT)
                          .astype(np.float16)), "latent_mean.npy", "non-finite"),
    ("Inf in std", _with("latent_std", np.full(LAT.shape, np.inf, np.float16)), "latent_std.npy", "non-finite"),
    ("std present but meta says mean", {**_meta(latent="mean")}, "latent_std.npy", "present"),
    ("boxes wrong N", _with("boxes", np.zeros((9, 4, 7), np.float32)), "boxes.npy", "shape"),
    ("box mask wrong dtype", _with("box_mask", np.ones((9, 5), np.uint8)), "box_mask.npy", "dtype"),
    ("class id out of range", _with("box_class", np.array([0, 1, 2, 3, 10], np.int8)), "box_class.npy", "0..9"),
    ("missing required array", _with("traj", None), "traj.npy", "missing"),
    ("bev unpacked", _with("bev", np.zeros((9, 8, 200, 200), np.uint8)), "bev.npy", "shape"),
    ("intrinsics wrong V", _with("intrinsics", np.zeros((3, 3, 3), np.float32)), "intrinsics.npy", "shape"),
    ("caption not str", _with("caption", b"bytes"), "caption.txt", "str"),
    # schema 3.0: fill mask, BEV grid per bucket, source camera
    ("fill mask missing", _with("fill_mask", None), "fill_mask.npy", "missing"),
    ("fill mask wrong dtype", _with("fill_mask", np.zeros((9, 6), np.uint8)), "fill_mask.npy", "dtype"),
    ("fill mask vs meta", _with("fill_mask", np.eye(9, 6, dtype=bool)), "fill_mask.npy", "same view-frames"),
    ("meta filled vs mask", _meta(filled=[[2, 1]]), "fill_mask.npy", "same view-frames"),
    ("filled unsorted", _meta(filled=[[3, 0], [2, 1]]), "meta.json", "sorted distinct"),
    ("filled out of range", _meta(filled=[[9, 0]]), "meta.json", "t < T=9"),
    ("filled not pairs", _meta(filled=[[1]]), "meta.json", "[t, v] pairs"),
    ("bev grid of another bucket", _meta(bev={"cells": 400, "cell_m": 0.25}), "meta.json", "schema.bev_grid"),
    ("bev grid missing", {**make_sample(), "meta": {k: v for k, v in make_sample()["meta"].items() if k != "bev"}},
     "meta.json", "missing field 'bev'"),
    ("bev of the 400 grid at 64 rows", _with("bev", np.zeros((9, 8, 400, 50), np.uint8)), "bev.npy", "shape"),
    ("source size wrong V", _meta(source_size=[[1600, 900]] * 5), "meta.json", "source_size"),
    ("source size not positive", _meta(source_size=[[1600, 0]] * 6), "meta.json", "source_size"),
    ("source intrinsics missing", _with("source_intrinsics", None), "source_intrinsics.npy", "missing"),
    ("source intrinsics NaN", _with("source_intrinsics", np.full((6, 3, 3), np.nan, np.float32)),
     "source_intrinsics.npy", "non-finite"),
]


@pytest.mark.parametrize("desc,sample,member,phrase", REJECTIONS, ids=[r[0] for r in REJECTIONS])
def test_encode_rejects(desc, sample, member, phrase):
    with pytest.raises(SchemaError) as e:
        encode_sample(sample)
    assert e.value.member == member
    assert phrase in str(e.value)


def _members():
    d = make_sample()
    return d["key"], encode_sample(d)


def _decode_mutated(mutate):
    key, m = _members()
    mutate(m)
    return decode_sample(m, key)


DECODE_REJECTIONS = [
    ("meta not json", lambda m: m.update({"meta.json": b"{not json"}), "meta.json", "not valid JSON"),
    ("meta missing", lambda m: m.pop("meta.json"), "meta.json", "missing"),
    ("truncated npy", lambda m: m.update({"boxes.npy": m["boxes.npy"][:40]}), "boxes.npy", "not a readable .npy"),
    ("pickled npy", lambda m: m.update({"boxes.npy": _object_npy()}), "boxes.npy", "without pickle"),
    ("unknown member", lambda m: m.update({"extra.npy": b""}), "extra.npy", "unknown member"),
    ("caption missing", lambda m: m.pop("caption.txt"), "caption.txt", "missing"),
    ("caption not utf8", lambda m: m.update({"caption.txt": b"\xff\xfe"}), "caption.txt", "UTF-8"),
    ("required array missing", lambda m: m.pop("box_track.npy"), "box_track.npy", "missing"),
    ("major version", lambda m: m.update({"meta.json": _meta_with(m, schema_version="0.9")}), "meta.json",
     "major version 0"),
]


def _object_npy():
    """An object-dtype .npy exactly as np.save writes one: a 1.0 header, then a pickle (never loaded here)."""
    import io
    import pickle
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": (1,)})
    buf.write(pickle.dumps(np.array([{"a": 1}], dtype=object), protocol=3))
    return buf.getvalue()


def _meta_with(m, **changes):
    meta = json.loads(m["meta.json"])
    meta.update(changes)
    return schema.meta_bytes(meta)


@pytest.mark.parametrize("desc,mutate,member,phrase", DECODE_REJECTIONS, ids=[r[0] for r in DECODE_REJECTIONS])
def test_decode_rejects(desc, mutate, member, phrase):
    with pytest.raises(SchemaError) as e:
        _decode_mutated(mutate)
    assert e.value.member == member
    assert phrase in str(e.value)
    assert e.value.key is not None and e.value.key in str(e.value)  # names the sample


def test_frame_count_rules():
    assert [t for t in range(0, 40) if schema.valid_num_frames(t)] == [1, 5, 9, 13, 17, 21, 25, 29, 33, 37]
    assert [t for t in range(0, 40) if schema.valid_bucket_frames(t)] == [1, 9, 17, 25, 33]
    assert [schema.latent_frames(t) for t in (1, 9, 17, 33, 65, 129)] == [1, 3, 5, 9, 17, 33]


def test_keys_and_paths():
    key = schema.sample_key("scene-0001", 12, 17, 224, 400)
    assert key == "scene-0001_0012_017_224x400" and "." not in key
    assert schema.shard_path("train", 224, 400, 17, 3) == "train/224x400_t17/shard-000003.tar"
    assert schema.manifest_path("val") == "val/manifest.parquet"
    with pytest.raises(SchemaError):
        schema.sample_key("scene.1", 0, 1, 64, 64)


@pytest.mark.parametrize("cells,half", [(200, 49.75), (400, 49.875)])
def test_bev_orientation_and_packing(cells, half):
    x, y = schema.bev_cell_centres(cells)
    assert x[0, 0] == pytest.approx(-half) and y[0, 0] == pytest.approx(half)   # top-left: left, ahead
    assert x[0, -1] == pytest.approx(half) and y[-1, 0] == pytest.approx(-half)  # right / behind
    assert x[0, 1] - x[0, 0] == pytest.approx(schema.BEV_EXTENT_M / cells)
    ahead = (y > 0) & (np.abs(x) < 5)
    packed = schema.pack_bev(ahead)
    assert packed.shape == (cells, cells // 8) and packed.dtype == np.uint8
    np.testing.assert_array_equal(schema.unpack_bev(packed), ahead)            # the size is inferred
    np.testing.assert_array_equal(schema.unpack_bev(packed, cells), ahead)
    assert schema.unpack_bev(packed)[:cells // 2].sum() == ahead.sum()  # "ahead" lives in the top rows


def test_class_tables_consistent():
    assert len(schema.OBJECT_CLASSES) == 10 and len(schema.MAP_CLASSES) == 8
    assert set(schema.NUSCENES_CATEGORY_TO_CLASS.values()) == set(schema.OBJECT_CLASSES)
    assert set(schema.MAP_POLYGON_CLASSES) | set(schema.MAP_LINE_CLASSES) == set(schema.MAP_CLASSES)
    assert schema.VIEWS[1] == schema.REFERENCE_VIEW


def test_schema_imports_without_torch_or_ray():
    code = textwrap.dedent("""
        import sys
        sys.modules['torch'] = None   # any import of torch/ray now raises ImportError
        sys.modules['ray'] = None
        import pipeline.contract.schema, pipeline.contract.shardio
        print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray') and sys.modules[m] is not None))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_all_finite_agrees_with_isfinite_on_every_special_value(dtype):
    info = np.finfo(dtype)
    specials = [0.0, -0.0, 1.0, -1.0, info.max, -info.max, info.tiny, info.tiny / 4, -info.tiny / 4,  # subnormals
                np.inf, -np.inf, np.nan, -np.nan]
    for v in specials:
        arr = np.zeros((3, 5), dtype)
        arr[1, 2] = dtype(v)
        assert schema.all_finite(arr) == bool(np.isfinite(arr).all()), (dtype, v)
        assert schema.all_finite(arr[:, ::2]) == bool(np.isfinite(arr[:, ::2]).all()), (dtype, v)  # strided view
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2 ** (8 * np.dtype(dtype).itemsize), size=4096, dtype=np.uint64, endpoint=False)
    arr = bits.astype({2: np.uint16, 4: np.uint32, 8: np.uint64}[np.dtype(dtype).itemsize]).view(dtype)
    for chunk in np.array_split(arr, 64):  # random bit patterns: some chunks hold NaN/Inf, some do not
        assert schema.all_finite(chunk) == bool(np.isfinite(chunk).all())


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(["<f2", "<f4", ">f4", "<f8", "<i8", ">i4", "|u1", "|b1", "<u2"]),
       shape=st.lists(st.integers(0, 5), min_size=0, max_size=4), fortran=st.booleans(), seed=st.integers(0, 9))
def test_npy_load_equals_np_load(dtype, shape, fortran, seed):
    """The cached-header fast path returns what np.load returns: values, dtype, shape, memory order, writability."""
    import io
    rng = np.random.default_rng(seed)
    arr = (rng.standard_normal(shape) * 100).astype(dtype)
    if fortran:
        arr = np.asfortranarray(arr)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    data = buf.getvalue()
    ref = np.load(io.BytesIO(data), allow_pickle=False)
    for _ in range(2):  # second call: header from the cache
        got = schema.npy_load(data)
        assert got.dtype == ref.dtype and got.shape == ref.shape and np.array_equal(got, ref, equal_nan=False)
        assert got.flags.f_contiguous == ref.flags.f_contiguous and got.flags.c_contiguous == ref.flags.c_contiguous
        assert got.flags.writeable and got.flags.owndata
    if arr.nbytes:
        with pytest.raises(SchemaError, match="not a readable .npy"):
            schema.npy_load(data[:-1])  # truncated data after a cached header
