"""train/iterable.py: the shards as a torch IterableDataset outside the trainer, and the padding collate."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from factories import make_sample
from factories_card import write_output
from pipeline.contract import schema
from train.iterable import ShardDataset, pad_collate, shard_urls


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("iter")
    write_output(out, {(64, 128, 9): 7, (64, 128, 1): 2}, per_shard=2, num_boxes=3)
    return out


def keys_of(out, split="train", bucket="64x128_t9") -> list[str]:
    from pipeline.contract.manifest import read_manifest
    return [k for r in read_manifest(str(out), split) if r.bucket == bucket for k in r.keys]


def test_two_workers_read_every_sample_once_in_contract_form(out):
    ds = ShardDataset(str(out), split="train", bucket="64x128_t9")
    assert len(ds.urls) == 4
    got = [s for s in DataLoader(ds, batch_size=None, num_workers=2)]
    assert sorted(s["key"] for s in got) == sorted(keys_of(out))
    s = got[0]
    assert s["latent_mean"].dtype == torch.float16 and s["latent_mean"].shape == (6, 16, 3, 8, 16)
    assert s["box_track"].dtype == torch.int32 and s["fill_mask"].shape == (9, 6) and s["meta"]["bev"]["cells"] == 200
    assert set(schema.ARRAY_FIELDS) <= set(s)


def test_ranks_split_the_shards_and_shuffle_is_seeded(out):
    per_rank = [[s["key"] for s in ShardDataset(str(out), bucket="64x128_t9", rank=r, world=2)] for r in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1]) and sorted(per_rank[0] + per_rank[1]) == sorted(keys_of(out))
    a = ShardDataset(str(out), bucket="64x128_t9", shuffle=True, seed=3)
    b = ShardDataset(str(out), bucket="64x128_t9", shuffle=True, seed=3)
    assert a.my_urls() == b.my_urls()
    orders = set()
    for e in range(6):
        a.set_epoch(e)
        orders.add(tuple(a.my_urls()))
    assert len(orders) > 1  # the epoch reshuffles


def test_unknown_bucket_and_missing_manifest_are_user_errors(out, tmp_path):
    from pipeline.contract import cli
    with pytest.raises(cli.UnknownName, match="64x128_t9"):
        ShardDataset(str(out), bucket="1x1_t1")
    with pytest.raises(cli.InputNotFound, match="manifest"):
        shard_urls(str(tmp_path))
    with pytest.raises(cli.BadInput):
        ShardDataset()


def test_pad_collate_pads_objects_to_the_batch_max():
    a = make_sample(num_frames=1, num_boxes=2, seed=1)
    b = make_sample(num_frames=1, num_boxes=5, seed=2)
    samples = [{k: (torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v) for k, v in s.items()}
               for s in (a, b)]
    batch = pad_collate(samples)
    assert batch["view_boxes"].shape == (2, 1, 6, 5, 7) and batch["box_mask"].dtype == torch.bool
    assert torch.equal(batch["view_boxes"][0, :, :, :2], samples[0]["view_boxes"])
    assert not batch["box_mask"][0, :, 2:].any() and not batch["box_view_mask"][0, :, :, 2:].any()
    assert (batch["box_class"][0, 2:] == -1).all() and (batch["box_track"][0, 2:] == -1).all()
    assert (batch["view_boxes"][0, :, :, 2:] == 0).all() and torch.equal(batch["box_class"][1], samples[1]["box_class"])
    assert batch["caption"] == [a["caption"], b["caption"]] and isinstance(batch["meta"], list)
    np_batch = pad_collate([{"boxes.npy": a["boxes"]}, {"boxes.npy": b["boxes"]}])  # webdataset's dicts
    assert isinstance(np_batch["boxes.npy"], np.ndarray) and np_batch["boxes.npy"].shape == (2, 1, 5, 7)
