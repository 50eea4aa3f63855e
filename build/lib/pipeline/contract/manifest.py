"""Manifests and quarantine tables (parquet): the source of truth for what a build produced.

A shard exists for readers only once a manifest row names it. Rows are sorted by
path so a manifest's bytes do not depend on the order shards finished in.
"""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass, fields

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.contract import schema, storage
from pipeline.contract.cli import BadInput

MANIFEST_SCHEMA = pa.schema([
    ("path", pa.string()),            # relative to the output root
    ("split", pa.string()),
    ("bucket", pa.string()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("num_frames", pa.int32()),
    ("samples", pa.int32()),
    ("bytes", pa.int64()),
    ("sha256", pa.string()),
    ("schema_version", pa.string()),
    ("config_hash", pa.string()),
    ("keys", pa.list_(pa.string())),
])

QUARANTINE_SCHEMA = pa.schema([
    ("stage", pa.string()),           # scenes | captions | frames | encode | write
    ("item", pa.string()),            # sample key, scene name or file
    ("reason", pa.string()),
    ("detail", pa.string()),
])


@dataclass
class ShardRecord:
    path: str
    split: str
    bucket: str
    height: int
    width: int
    num_frames: int
    samples: int
    bytes: int
    sha256: str
    schema_version: str
    config_hash: str
    keys: list[str]


@dataclass
class QuarantineRecord:
    stage: str
    item: str
    reason: str
    detail: str = ""


def _table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    # no statistics/created_by variance: deterministic bytes for identical rows
    pq.write_table(table, buf, compression="zstd", write_statistics=False)
    return buf.getvalue()


def write_table(uri: str, table: pa.Table) -> None:
    storage.atomic_write(uri, _table_bytes(table))


class TableFileError(BadInput):
    """A manifest, quarantine or clip table that cannot be read; the message names the file."""


def read_table(uri: str) -> pa.Table:
    # read here, in this thread: pq.read_table's dataset scanner drops its Python file object on an Arrow
    # pool thread after returning, and when that happens while the interpreter exits (a command that read
    # a manifest and stops with an error line) the thread cannot take the GIL and the process aborts
    data = storage.read_bytes(uri)
    try:
        return pq.ParquetFile(pa.BufferReader(data)).read(use_threads=False)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise TableFileError(f"{uri}: not a readable parquet table ({type(e).__name__}: {e}); delete it and rerun "
                             f"the command that writes it (a build rewrites its manifests and quarantine)") from None


def _records(uri: str, cls, table: pa.Table) -> list:
    names = [f.name for f in fields(cls)]
    missing = [n for n in names if n not in table.column_names]
    if missing:
        raise TableFileError(f"{uri}: columns {missing} are missing (has {table.column_names}); it was written by "
                             f"another version: delete it and rerun the build")
    return [cls(**{k: r[k] for k in names}) for r in table.select(names).to_pylist()]


def write_manifest(out: str, split: str, records: list[ShardRecord]) -> str:
    uri = storage.join(out, schema.manifest_path(split))
    rows = sorted((asdict(r) for r in records), key=lambda r: r["path"])
    write_table(uri, pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA))
    return uri


def read_manifest(out: str, split: str) -> list[ShardRecord]:
    uri = storage.join(out, schema.manifest_path(split))
    if not storage.exists(uri):
        return []
    return _records(uri, ShardRecord, read_table(uri))


def write_quarantine(out: str, records: list[QuarantineRecord]) -> str:
    uri = storage.join(out, schema.QUARANTINE_FILE)
    rows = sorted((asdict(r) for r in records), key=lambda r: (r["stage"], r["item"], r["reason"]))
    write_table(uri, pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA))
    return uri


def read_quarantine(out: str) -> list[QuarantineRecord]:
    uri = storage.join(out, schema.QUARANTINE_FILE)
    if not storage.exists(uri):
        return []
    return _records(uri, QuarantineRecord, read_table(uri))
