"""The nuScenes tables checked before use: each field's type, each token once.

A table that disagrees with itself is refused, not used: two ``ego_pose`` records with one token
and different content would let the later one win silently (the trajectory, boxes and
extrinsics of a sample jump by metres), a wrong-typed field would surface as a bare pyarrow
message naming no file, record or field. :func:`check_record` runs on every record as the index
streams it (pipeline/scenes/tableindex.py); :func:`duplicate_tokens` runs on the arrow table.
Every refusal is one :class:`TableError` (a user error: one ``error:`` line, exit 2) naming the
file, the record's token and position, and the field. Identical repeats of a record are dropped.

The field table is the nuScenes v1.0 schema (nuscenes-devkit ``docs/schema_nuscenes.md``), the
fields the scene stage reads; other fields may be present and are kept as they are.
"""
from __future__ import annotations

import json
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.contract.cli import BadInput


class TableError(BadInput):
    """A nuScenes table that is not what the scene stage can use; the message names file, record and field."""


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _vec(n: int) -> Callable[[Any], bool]:
    def ok(v: Any) -> bool:
        return isinstance(v, list) and len(v) == n and all(_num(x) for x in v)
    ok.__doc__ = f"a list of {n} numbers"
    return ok


def _matrix_or_empty(v: Any) -> bool:
    """[] or a 3 x 3 list of numbers"""
    return v == [] or (isinstance(v, list) and len(v) == 3 and all(_vec(3)(r) for r in v))


def _str(v: Any) -> bool:
    """a string"""
    return isinstance(v, str)


def _int(v: Any) -> bool:
    """an integer"""
    return isinstance(v, int) and not isinstance(v, bool)


def _bool(v: Any) -> bool:
    """true or false"""
    return isinstance(v, bool)


def _strs(v: Any) -> bool:
    """a list of strings"""
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


S, I, B, V3, V4, LS = _str, _int, _bool, _vec(3), _vec(4), _strs
FIELDS: dict[str, dict[str, Callable[[Any], bool]]] = {
    "attribute": {"token": S, "name": S, "description": S},
    "calibrated_sensor": {"token": S, "sensor_token": S, "translation": V3, "rotation": V4,
                          "camera_intrinsic": _matrix_or_empty},
    "category": {"token": S, "name": S, "description": S},
    "ego_pose": {"token": S, "timestamp": I, "rotation": V4, "translation": V3},
    "instance": {"token": S, "category_token": S, "nbr_annotations": I, "first_annotation_token": S,
                 "last_annotation_token": S},
    "log": {"token": S, "logfile": S, "vehicle": S, "date_captured": S, "location": S},
    "map": {"token": S, "log_tokens": LS, "category": S, "filename": S},
    "sample": {"token": S, "timestamp": I, "prev": S, "next": S, "scene_token": S},
    "sample_annotation": {"token": S, "sample_token": S, "instance_token": S, "attribute_tokens": LS,
                          "visibility_token": S, "translation": V3, "size": V3, "rotation": V4, "prev": S, "next": S,
                          "num_lidar_pts": I, "num_radar_pts": I},
    "sample_data": {"token": S, "sample_token": S, "ego_pose_token": S, "calibrated_sensor_token": S, "timestamp": I,
                    "fileformat": S, "is_key_frame": B, "height": I, "width": I, "filename": S, "prev": S, "next": S},
    "scene": {"token": S, "log_token": S, "nbr_samples": I, "first_sample_token": S, "last_sample_token": S,
              "name": S, "description": S},
    "sensor": {"token": S, "channel": S, "modality": S},
    "visibility": {"token": S, "level": S, "description": S},
}


def _show(v: Any) -> str:
    text = json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


def check_record(table: str, path: str, index: int, line: int | None, rec: Any) -> None:
    """A TableError naming the first field of record ``index`` (0-based; at ``line``) that is missing or mistyped."""
    where = f"{path}: record {index + 1}" + (f" (line {line})" if line else "")
    if not isinstance(rec, dict):
        raise TableError(f"{where} is {type(rec).__name__}, not a JSON object; the table is malformed: regenerate it")
    token = rec.get("token")
    if not isinstance(token, str) or not token:
        raise TableError(f"{where}: field 'token' is {_show(token)}, expected a non-empty string")
    for name, ok in FIELDS.get(table, {}).items():
        if name not in rec:
            raise TableError(f"{where}, token {token}: field {name!r} is missing (nuScenes v1.0 {table} records have "
                             f"{sorted(FIELDS[table])})")
        if not ok(rec[name]):
            raise TableError(f"{where}, token {token}: field {name!r} is {_show(rec[name])}, expected {ok.__doc__}")


def duplicate_tokens(table: str, path: str, t: pa.Table, lines: list[int] | None = None) -> pa.Table:
    """``t`` with identical repeats of a record dropped; a TableError for a token whose records differ."""
    if t.num_rows == 0 or "token" not in t.column_names:
        return t
    counts = pc.value_counts(t["token"])
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(repeated) == 0:
        return t
    rows = pc.is_in(t["token"], value_set=repeated)
    idx = pc.indices_nonzero(rows).to_pylist()
    seen: dict[str, tuple[int, dict]] = {}
    drop = []
    for i, rec in zip(idx, t.take(idx).to_pylist()):
        tok = rec["token"]
        if tok not in seen:
            seen[tok] = (i, rec)
            continue
        j, first = seen[tok]
        if rec != first:
            fields = sorted(k for k in set(first) | set(rec) if first.get(k) != rec.get(k))
            at = (lambda k: f"record {k + 1}" + (f" (line {lines[k]})" if lines else ""))
            raise TableError(f"{path}: token {tok} appears twice with different content ({at(j)} and {at(i)}; field "
                             f"{fields[0]!r}: {_show(first.get(fields[0]))} vs {_show(rec.get(fields[0]))}"
                             + (f", and {len(fields) - 1} more" if len(fields) > 1 else "")
                             + f"): one {table} record per token; fix or regenerate the table")
        drop.append(i)
    keep = pc.invert(pc.is_in(pa.array(range(t.num_rows)), value_set=pa.array(drop)))
    return t.filter(keep)
