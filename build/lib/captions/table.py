"""The caption table (parquet) and its role as the cache.

One row per (clip key, generation): key, source (mllm | dataset | none), model, prompt
version, text, token usage, created-at, image hash, cache key, generation params. An
MLLM row's cache key is sha256(image hash, prompt version, prompt text, model, params),
so a re-run asks the server only for cache keys it has no row for, and clips whose
middle frames are byte-identical share one answer. Rows of older prompts/models stay in
the table (compare prompt versions side by side); the caption a stage uses is the one
whose cache key matches its config.

Resume: answers are checkpointed as small part files next to the table
(``captions.parquet.parts/part-*.parquet``) every ``flush_every`` answers; a killed run
loses at most that many answers. ``compact()`` folds the parts into the table, sorted,
so the final bytes depend only on the rows.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import asdict

import pyarrow as pa

from pipeline.contract import storage
from pipeline.contract.cli import BadInput
from pipeline.contract.manifest import QuarantineRecord, read_table, write_table

CAPTION_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("source", pa.string()),             # mllm | dataset | none
    ("model", pa.string()),              # null unless mllm
    ("prompt_version", pa.string()),     # null unless mllm
    ("text", pa.string()),
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("created_at", pa.string()),         # UTC ISO-8601 of the answer; null for dataset/none (deterministic)
    ("image_hash", pa.string()),         # sha256 of the middle-frame views' source bytes
    ("cache_key", pa.string()),
    ("params", pa.string()),             # generation params JSON
])
COLUMNS = tuple(CAPTION_SCHEMA.names)
QUARANTINE_TABLE_SCHEMA = pa.schema([("stage", pa.string()), ("item", pa.string()),
                                     ("reason", pa.string()), ("detail", pa.string())])


def cache_key(image_hash: str, prompt_version: str, prompt_sha: str, model: str, params_json: str) -> str:
    h = hashlib.sha256("\0".join((image_hash, prompt_version, prompt_sha, model, params_json)).encode())
    return h.hexdigest()


def _identity(row: dict) -> tuple[str, str]:
    return (row["key"], row["cache_key"] if row["source"] == "mllm" else row["source"])


def _sort_key(row: dict) -> tuple:
    return (row["key"], row["source"], row["prompt_version"] or "", row["model"] or "", row["cache_key"] or "")


class CaptionTable:
    """In-memory view of a caption table plus its un-compacted parts. Not thread-safe: the
    stage's collector thread is the only writer."""

    def __init__(self, uri: str):
        self.uri = str(uri)
        self.parts_dir = self.uri + ".parts"
        self.rows: dict[tuple[str, str], dict] = {}
        self.by_cache: dict[str, dict] = {}
        self._pending: list[dict] = []
        self._parts_written: list[str] = []
        self._load()

    def _load(self) -> None:
        sources = [self.uri] if storage.exists(self.uri) else []
        sources += storage.glob(storage.join(self.parts_dir, "part-*.parquet"))
        for uri in sources:
            table = read_table(uri)
            missing = set(COLUMNS) - set(table.column_names)
            if missing:
                raise BadInput(f"{uri}: not a caption table (missing columns {sorted(missing)}); "
                               f"move it away or pass another --out")
            for row in table.select(list(COLUMNS)).to_pylist():
                self._put(row)

    def _put(self, row: dict) -> None:
        self.rows[_identity(row)] = row
        if row["source"] == "mllm" and row["cache_key"]:
            self.by_cache[row["cache_key"]] = row

    def cached(self, key: str) -> dict | None:
        return self.by_cache.get(key)

    def add(self, row: dict) -> None:
        row = {c: row.get(c) for c in COLUMNS}
        ident = _identity(row)
        if self.rows.get(ident) == row:
            return
        self._put(row)
        self._pending.append(row)

    def checkpoint(self) -> None:
        """Persist the rows added since the last checkpoint as one part file."""
        if not self._pending:
            return
        uri = storage.join(self.parts_dir, f"part-{os.getpid()}-{uuid.uuid4().hex}.parquet")
        write_table(uri, pa.Table.from_pylist(self._pending, schema=CAPTION_SCHEMA))
        self._parts_written.append(uri)
        self._pending = []

    def compact(self) -> str:
        """Write every row to the table, sorted, then remove the part files."""
        rows = sorted(self.rows.values(), key=_sort_key)
        write_table(self.uri, pa.Table.from_pylist(rows, schema=CAPTION_SCHEMA))
        for uri in storage.glob(storage.join(self.parts_dir, "part-*.parquet")):
            storage.remove(uri)
        if not storage.is_remote(self.parts_dir) and os.path.isdir(self.parts_dir):
            try:
                os.rmdir(self.parts_dir)
            except OSError:
                pass
        self._pending = []
        return self.uri


def read_captions(uri: str) -> pa.Table:
    """The caption table as written (compacted)."""
    return read_table(uri)


def write_quarantine_file(uri: str, records: list[QuarantineRecord], replace_items: set[str] | None = None) -> str:
    """Merge caption quarantine records into a quarantine parquet (same schema as
    pipeline/contract/manifest.py): rows of stage 'captions' for the items handled now are replaced,
    everything else is kept, so a re-run that succeeds clears its old failures. Nothing left: no file
    (an existing one is removed; a missing quarantine file reads as no rows)."""
    rows: list[dict] = []
    exists = storage.exists(uri)
    if exists:
        replace_items = replace_items or set()
        rows = [r for r in read_table(uri).to_pylist()
                if not (r["stage"] == "captions" and r["item"] in replace_items)]
    rows += [asdict(r) for r in records]
    if not rows:
        if exists:
            storage.remove(uri)
        return uri
    rows.sort(key=lambda r: (r["stage"], r["item"], r["reason"]))
    write_table(uri, pa.Table.from_pylist(rows, schema=QUARANTINE_TABLE_SCHEMA))
    return uri
