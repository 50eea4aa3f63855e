"""The shards as a plain torch IterableDataset, for use outside the trainer (docs/dataset.md).

    from torch.utils.data import DataLoader
    from train.iterable import ShardDataset, pad_collate
    ds = ShardDataset("demo_out/shards", split="train", bucket="64x128_t9")
    for batch in DataLoader(ds, batch_size=4, num_workers=2, collate_fn=pad_collate):
        batch["latent_mean"]     # (B, V, 16, T', H/8, W/8) float16 tensor
        batch["view_boxes"]      # (B, T, V, N_max, 7): N padded to the batch's largest, box_mask False there

Samples come from the trainer's own tar reader (train/tario.py: one read per shard, read ahead, arrays as
views of it) and are validated by the contract (``schema.decode_sample``): every member by its field name
(``latent_mean``, ``boxes``, ...), ``meta`` (meta.json), ``caption``, ``key``. Each DataLoader worker (and
each rank, with ``rank``/``world``) reads its own shards. One pass in manifest order, or shuffled shards per
``epoch`` with ``shuffle=True``. Unlike the trainer's loader there are no bucket batches, no latent draws and
no condition drops: what a sample holds, as tensors.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.contract import cli, manifest, schema, storage
from train.data import expand_urls, open_url
from train.tario import tar_samples

# what pad_collate fills padded objects with: masks False (absent), classes and tracks -1 (no object), else 0
PAD_VALUES = {"box_class": -1, "box_track": -1, "box_class.npy": -1, "box_track.npy": -1}


def shard_urls(root: str, split: str = "train", bucket: str | None = None) -> list[str]:
    """The shards a build output lists in its manifest for one split (one bucket, or all), in manifest order."""
    records = manifest.read_manifest(root, split)
    if not records:
        raise cli.InputNotFound(f"no {storage.join(root, schema.manifest_path(split))}: pass a build output root "
                                f"(the --out of pipeline/build.py) and one of its splits")
    known = sorted({r.bucket for r in records})
    if bucket is not None and bucket not in known:
        raise cli.UnknownName(f"bucket {bucket!r} is not in the {split} split; it has {known}")
    return [storage.join(root, r.path) for r in records if bucket is None or r.bucket == bucket]


class ShardDataset(IterableDataset):
    """Decoded samples (dicts of tensors, plus key, caption, views, shape) of a build output or shard URLs."""

    def __init__(self, root: str | None = None, split: str = "train", bucket: str | None = None,
                 urls: list[str] | str | None = None, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                 rank: int = 0, world: int = 1, tensors: bool = True):
        if (root is None) == (urls is None):
            raise cli.BadInput("ShardDataset: give either root (a build output) or urls (shard paths/patterns)")
        self.urls = shard_urls(root, split, bucket) if root is not None else expand_urls(urls)
        self.shuffle, self.seed, self.epoch, self.rank, self.world = shuffle, seed, epoch, rank, world
        self.tensors = tensors

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def my_urls(self) -> list[str]:
        """This rank's and this DataLoader worker's shards: every (rank, worker) reads a disjoint share."""
        order = list(self.urls)
        if self.shuffle:
            order = [order[i] for i in np.random.default_rng((self.seed, self.epoch)).permutation(len(order))]
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return order[self.rank * workers + worker::self.world * workers]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        def on_damage(d) -> None:  # a damaged shard is an error here: nothing skips silently
            raise ValueError(f"damaged shard {d}")

        def per_shard(samples):
            return [sample_dict(raw) for raw in samples]

        sources = (dict(url=u, stream=open_url(u)) for u in self.my_urls())
        for sample in tar_samples(sources, on_damage, per_shard=per_shard):
            yield as_tensors(sample) if self.tensors else sample


def sample_dict(raw: dict) -> dict[str, Any]:
    """A webdataset member dict -> {key, url, meta, caption, every array member by field name} (contract-checked;
    an absent optional member is None)."""
    s = schema.decode_sample({k: v for k, v in raw.items() if k not in ("__url__", "__local_path__")})
    return {"key": s.key, "url": raw.get("__url__"), "meta": s.meta, "caption": s.caption,
            **{name: getattr(s, name) for name in schema.ARRAY_FIELDS}}


def as_tensors(sample: dict[str, Any]) -> dict[str, Any]:
    """Arrays as tensors (copied: the reader's arrays are read-only views of the shard), the rest unchanged."""
    return {k: torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v for k, v in sample.items()}


def _pad(arrays: list, fill: Any) -> np.ndarray | torch.Tensor:
    """Stack arrays whose shapes differ (the object axis N) after padding each axis to the largest."""
    torch_in = isinstance(arrays[0], torch.Tensor)
    xs = [a.numpy() if torch_in else np.asarray(a) for a in arrays]
    shape = tuple(max(s) for s in zip(*(x.shape for x in xs)))
    out = np.full((len(xs),) + shape, fill, dtype=xs[0].dtype)
    for i, x in enumerate(xs):
        out[(i,) + tuple(slice(0, n) for n in x.shape)] = x
    return torch.from_numpy(out) if torch_in else out


def pad_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch of samples of one bucket: arrays stacked, the per-sample object count N padded to the batch's
    largest (box_mask / box_view_mask False, box_class / box_track -1, boxes 0 there); strings and dicts as
    lists. Works on ShardDataset samples (tensors or arrays) and on webdataset's decoded dicts
    ("boxes.npy", ...); a value that is None anywhere (an optional member) stays a list."""
    out: dict[str, Any] = {}
    for k in samples[0]:
        vals = [s[k] for s in samples]
        if all(isinstance(v, (np.ndarray, torch.Tensor)) for v in vals) and len({v.ndim for v in vals}) == 1:
            boolean = vals[0].dtype == (torch.bool if isinstance(vals[0], torch.Tensor) else np.bool_)
            out[k] = _pad(vals, PAD_VALUES.get(k, False if boolean else 0))
        else:
            out[k] = vals
    return out
