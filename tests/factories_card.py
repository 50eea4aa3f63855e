"""A build output made of factory shards (tests/factories.py), with manifests, quarantine, card and info.json,
without Ray or a VAE: for the card, reader and viewer tests that need a folder laid out like the build's."""
from __future__ import annotations

from pathlib import Path

from factories import write_shards
from pipeline.contract import schema
from pipeline.contract.manifest import ShardRecord, write_manifest, write_quarantine
from pipeline.contract.shardio import iter_shard, sha256_bytes
from pipeline.shards.card import write_card

BUILD = {"dataset": "v1.0-synth", "version": "v1.0-synth", "dataroot": "/data/synth", "scenes": 2,
         "stage": "factory", "vae": {"name": "tiny-random", "scaling_factor": 1.15258426}, "tiny_vae": True,
         "captions": "dataset", "config_hash": "f" * 16}


def write_output(out: Path, buckets: dict[tuple[int, int, int], int], splits=("train", "val"), per_shard: int = 2,
                 **sample_kw) -> list[ShardRecord]:
    records = []
    for i, split in enumerate(splits):
        mine = []
        for p in write_shards(out, buckets, split=split, per_shard=per_shard, seed=100 * i, **sample_kw):
            data = p.read_bytes()
            h, w = (int(x) for x in p.parent.name.split("_t")[0].split("x"))
            t = int(p.parent.name.split("_t")[1])
            keys = [k for k, _ in iter_shard(data)]
            mine.append(ShardRecord(str(p.relative_to(out)), split, p.parent.name, h, w, t, len(keys), len(data),
                                    sha256_bytes(data), schema.SCHEMA_VERSION, BUILD["config_hash"], keys))
        write_manifest(str(out), split, mine)
        records += mine
    write_quarantine(str(out), [])
    write_card(str(out), records, 0, BUILD)
    return records
