"""One bucket's batch: the Batch the trainer reads, and collate, which assembles it from decoded samples.

The one copy between a shard and the trainer happens here: the decoded arrays are views into the shard
mapping (train/tario.py) and collate stacks them straight into the batch's tensors, which are views of
one allocation (one shared-memory segment, or one ring slot, in a DataLoader worker: train/batchring.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch.utils.data import get_worker_info

from pipeline.contract import schema
from train import clip_length

log = logging.getLogger("train.data")


@dataclass
class Batch:
    """One bucket's batch. Shapes: B samples, V views, T frames, N boxes (padded)."""
    step: int
    bucket: str
    keys: list[str]
    captions: list[str]
    latent_mean: torch.Tensor    # (B, V, 16, T', H/8, W/8) float16, unscaled posterior mean
    latent_std: torch.Tensor | None  # same, posterior std (None when the shards store the mean only)
    scaling_factor: torch.Tensor # (B,) the VAE scaling factor s of each sample
    intrinsics: torch.Tensor     # (B, V, 3, 3) at the stored resolution
    source_intrinsics: torch.Tensor  # (B, V, 3, 3) float32, K of the original images (e.g. 1600x900)
    cam2lidar: torch.Tensor      # (B, T, V, 4, 4) camera v at its exposure -> LiDAR(t)
    boxes: torch.Tensor          # (B, T, N, 7) reference boxes (CAM_FRONT time); the model reads view_boxes
    view_boxes: torch.Tensor     # (B, T, V, N, 7) each view's boxes at its own exposure, in LiDAR(t)
    box_class: torch.Tensor      # (B, N) long
    box_mask: torch.Tensor       # (B, T, N) bool
    box_view_mask: torch.Tensor  # (B, T, V, N) bool
    traj: torch.Tensor           # (B, T, 4, 4)
    bev: torch.Tensor            # (B, T, 8, G, G/8) uint8, bit-packed as stored (schema.pack_bev), G of the bucket
    fill_mask: torch.Tensor      # (B, T, V) bool, view-frames whose image is a repaired drop (schema 3.0)
    stats: dict = field(default_factory=dict)

    def pin_memory(self) -> "Batch":
        """Called by the DataLoader's pin-memory thread (pin_memory=True on a CUDA machine)."""
        import dataclasses
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).pin_memory() for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.latent_mean.shape)

    def sample_latents(self, gen: torch.Generator | list[torch.Generator] | None = None,
                       device: torch.device | str = "cpu") -> torch.Tensor:
        """z = s * (mean + std * eps), a fresh posterior draw -> (B, V, 16, T', H/8, W/8) float32 on device.
        ``gen`` one generator for the batch, or one per sample (train/loss.py: sample i's eps from gen[i])."""
        mean = self.latent_mean.to(device).float()
        s = self.scaling_factor.to(device).float().view(-1, *([1] * (mean.dim() - 1)))
        if self.latent_std is None:
            return s * mean
        if isinstance(gen, (list, tuple)):
            eps = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in gen]).to(device)
        else:
            eps = torch.randn(mean.shape, generator=gen).to(device)
        return s * (mean + self.latent_std.to(device).float() * eps)

    def conditions(self, text: torch.Tensor, text_mask: torch.Tensor, device: torch.device | str = "cpu"):
        """The model's Conditions on ``device``; the BEV maps travel packed and are unpacked there.
        model/native.py turns them into the authors' inputs (the one conversion training and sampling use)."""
        from model.conditions import Conditions
        return Conditions(text=text, text_mask=text_mask, intrinsics=self.intrinsics, cam2lidar=self.cam2lidar,
                          boxes=self.boxes, view_boxes=self.view_boxes, box_class=self.box_class,
                          box_mask=self.box_mask, box_view_mask=self.box_view_mask, traj=self.traj,
                          bev=unpack_bev(self.bev.to(device)).float(),
                          source_intrinsics=self.source_intrinsics).to(device)


_BIT_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)  # np.packbits' default bit order: first cell = high bit


def unpack_bev(packed: torch.Tensor) -> torch.Tensor:
    """(..., G, G/8) uint8 -> (..., G, G) bool, on packed's device: schema.unpack_bev in torch (G = the rows).

    The batches keep the maps packed: 8x fewer bytes through DataLoader worker queues and to the GPU."""
    bits = (packed.unsqueeze(-1) >> _BIT_SHIFTS.to(packed.device)) & 1   # (..., G, G/8, 8)
    return bits.flatten(-2)[..., :packed.shape[-2]].bool()


class _BatchArena:
    """The tensors of one batch as views of ONE allocation: in a DataLoader worker that is one
    shared-memory segment, so a batch crosses to the main process as one file descriptor (and one
    mapping) instead of one per field, which cost the main process more CPU than the loading itself."""

    def __init__(self, specs: list[tuple[tuple[int, ...], np.dtype]],
                 allocate: Callable[[int], torch.UntypedStorage] | None = None):
        self.offsets, total = [], 0
        for shape, dtype in specs:
            self.offsets.append(total)
            total += -(-int(np.prod(shape)) * dtype.itemsize // 64) * 64  # 64-byte aligned: any dtype, SIMD
        total = max(total, 64)
        if allocate is not None:  # a ring slot (train/batchring.py)
            self.storage = allocate(total)
        else:
            self.storage = (torch.UntypedStorage._new_shared(total) if get_worker_info() is not None
                            else torch.UntypedStorage(total))
        self.specs, self.next = specs, 0

    def take(self) -> torch.Tensor:
        shape, dtype = self.specs[self.next]
        tdtype = torch.from_numpy(np.empty(0, dtype)).dtype
        offset = self.offsets[self.next] // dtype.itemsize
        self.next += 1
        return torch.empty(0, dtype=tdtype).set_(self.storage, offset, shape)


def _stack_shape(arrs: list[np.ndarray], axis: int | None, size: int) -> tuple[int, ...]:
    shape = list(arrs[0].shape)
    if axis is not None:
        shape[axis] = size
    return (len(arrs), *shape)


def stacked(arrs: list[np.ndarray], axis: int | None, out: torch.Tensor) -> torch.Tensor:
    """Stack straight into the batch tensor ``out``, zero-padding ``axis`` to its size: the one copy
    between the shard buffer and the batch (the arrays are views into it, train/tario.py)."""
    o = out.numpy()
    if axis is None:
        np.stack(arrs, out=o)
        return out
    lead = (slice(None),) * axis
    for i, a in enumerate(arrs):
        k = a.shape[axis]
        o[(i, *lead, slice(0, k))] = a
        o[(i, *lead, slice(k, None))] = 0
    return out


def collate(samples: list[dict], step: int, bucket: str,
            allocate: Callable[[int], torch.UntypedStorage] | None = None) -> Batch:
    """Stack decoded samples into a Batch, its tensors views of one allocation (``allocate(nbytes)``, or
    new memory: shared memory in a DataLoader worker)."""
    views = {s["views"] for s in samples}
    if len(views) != 1:
        raise ValueError(f"bucket {bucket}: samples with different view lists {sorted(views)} cannot share a batch")
    lengths = [s["shape"][2] for s in samples]
    if len(set(lengths)) > 1:
        # a "full" bucket mixes clip lengths: keep a common prefix (train/clip_length.py says when
        # its latents are exact: always for the pipeline's 8k+1 clips)
        t, exact = clip_length.common_prefix(lengths)
        if not exact:
            log.warning("bucket %s: clips of %s frames share no exact CogVAE prefix; cropped to %d frames, "
                        "latents of the longer clips approximate", bucket, sorted(set(lengths)), t)
        samples = [clip_length.crop_frames(s, t) for s in samples]
    n = max(s["box_class"].shape[0] for s in samples)
    # name: (axis zero-padded to the batch's N boxes, dtype in the batch when not the stored one)
    fields = {"latent_mean": (None, None), "intrinsics": (None, None), "source_intrinsics": (None, None),
              "cam2lidar": (None, None), "fill_mask": (None, None),
              "boxes": (1, None), "view_boxes": (2, None), "box_class": (0, np.int64), "box_mask": (1, None),
              "box_view_mask": (2, None), "traj": (None, None), "bev": (None, None), "scaling_factor": (None, None)}
    arrays = {name: [np.asarray(s[name], np.float64 if name == "scaling_factor" else None) for s in samples]
              for name in fields}
    if all(s["latent_std"] is not None for s in samples):
        fields["latent_std"], arrays["latent_std"] = (None, None), [s["latent_std"] for s in samples]
    arena = _BatchArena([(_stack_shape(arrays[k], axis, n), np.dtype(dtype or arrays[k][0].dtype))
                         for k, (axis, dtype) in fields.items()], allocate)
    out = {k: stacked(arrays[k], axis, arena.take()) for k, (axis, _) in fields.items()}
    return Batch(step=step, bucket=bucket, keys=[s["key"] for s in samples], captions=[s["caption"] for s in samples],
                 latent_mean=out["latent_mean"], latent_std=out.get("latent_std"),
                 scaling_factor=out["scaling_factor"], intrinsics=out["intrinsics"],
                 source_intrinsics=out["source_intrinsics"], cam2lidar=out["cam2lidar"], fill_mask=out["fill_mask"],
                 boxes=out["boxes"], view_boxes=out["view_boxes"], box_class=out["box_class"],
                 box_mask=out["box_mask"], box_view_mask=out["box_view_mask"], traj=out["traj"], bev=out["bev"])
