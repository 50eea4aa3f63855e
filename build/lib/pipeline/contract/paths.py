"""The output layout of a build: sample keys, bucket names and every path under ``--out`` (the only place
these templates live; re-exported by pipeline/contract/schema.py, which also checks keys). Standard library only."""
from __future__ import annotations

KEY_TEMPLATE = "{scene_name}_{start:04d}_{num_frames:03d}_{height}x{width}"
BUCKET_TEMPLATE = "{height}x{width}_t{num_frames}"
SHARD_TEMPLATE = "{split}/{bucket}/shard-{index:06d}.tar"   # relative to --out
MANIFEST_TEMPLATE = "{split}/manifest.parquet"               # relative to --out
QUARANTINE_FILE = "quarantine.parquet"                      # relative to --out
CAPTIONS_FILE = "captions.parquet"                          # relative to --out
WORK_DIR = "_work"                                          # relative to --out
SCENE_STORE_TEMPLATE = WORK_DIR + "/scenes/{scene_name}.zarr"
CLIP_INDEX_FILE = WORK_DIR + "/clips.parquet"
TABLE_INDEX_TEMPLATE = WORK_DIR + "/tables/{version}"          # per-scene columnar tables (pipeline/scenes/tableindex.py)
DATASET_CARD_FILE = "README.md"                             # the dataset card (pipeline/shards/card.py)
LOCK_FILE = WORK_DIR + "/lock.json"                          # the one writer of --out (pipeline/contract/outlock.py)
DATASET_INFO_FILE = "info.json"                             # the same facts, machine-readable


def bucket_name(height: int, width: int, num_frames: int) -> str:
    return BUCKET_TEMPLATE.format(height=height, width=width, num_frames=num_frames)


def shard_path(split: str, height: int, width: int, num_frames: int, index: int) -> str:
    return SHARD_TEMPLATE.format(split=split, bucket=bucket_name(height, width, num_frames), index=index)


def manifest_path(split: str) -> str:
    return MANIFEST_TEMPLATE.format(split=split)


def table_index_path(version: str) -> str:
    return TABLE_INDEX_TEMPLATE.format(version=version)


def scene_store_path(scene_name: str) -> str:
    return SCENE_STORE_TEMPLATE.format(scene_name=scene_name)
