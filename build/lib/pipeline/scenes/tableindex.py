"""The nuScenes tables, read once per job into a per-scene columnar index.

At v1.0-trainval the devkit's in-memory database is about 14.6 GB per process, so neither the
driver nor a Ray worker may hold it. ``ensure_table_index`` streams the JSON tables once (bounded
memory: chunked reads + ``json.JSONDecoder.raw_decode``, never a ``json.load`` of a big table)
into parquet files under ``{out}/`` + ``schema.table_index_path(version)``: the five tables that
grow with the data (sample, sample_data, ego_pose, sample_annotation, instance) sorted by scene,
one row group per scene; the small ones (scene, log, map, calibrated_sensor, sensor, category,
attribute, visibility) whole. ``SceneTables`` then reads one scene's row groups and offers the part
of the devkit interface the scene code uses (``get``, ``scene``, ``version``, ``dataroot``), with the
devkit's decorations (sample_data ``channel``/``sensor_modality``, sample ``data``/``anns``,
sample_annotation ``category_name``, log ``map_token``), so pipeline/scenes/nuscenes.py,
pipeline/scenes/interpolate.py and pipeline/scenes/scenestore.py run unchanged on either. The devkit stays
the reference: tests/test_tables_index.py builds scene stores both ways and compares them.

Records that belong to no scene (an ego_pose no sample_data names, say) are left out: no scene
task can reach them.
"""
from __future__ import annotations

import io
import json
import os
import time
from functools import lru_cache

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.contract import schema, storage
from pipeline.scenes.jsonstream import iter_json_array, iter_json_records  # noqa: F401  (part of this module's API)
from pipeline.scenes.tablecheck import TableError, check_record, duplicate_tokens

INDEX_FORMAT = 1
PER_SCENE = ("sample", "sample_data", "ego_pose", "sample_annotation", "instance")
WHOLE = ("scene", "log", "map", "calibrated_sensor", "sensor", "category", "attribute", "visibility")
SCENE_COL = "_scene"          # scene index (position in scene.json) of each per-scene row
META_FILE = "index.json"
BATCH = 50_000                # records per arrow batch while parsing (bounds the Python objects alive)


# ---- streaming JSON -> arrow ----------------------------------------------------------------------

def read_table_json(path: str) -> pa.Table:
    """One nuScenes table as arrow, parsed in batches of BATCH records (schemas unified across batches), every
    record's fields checked and every token once (pipeline/scenes/tablecheck.py): a TableError names the file,
    the record and the field of the first problem."""
    table = os.path.basename(path).rsplit(".", 1)[0]
    parts, batch, lines = [], [], []
    for i, (line, rec) in enumerate(iter_json_records(path)):
        check_record(table, path, i, line, rec)
        batch.append(rec)
        lines.append(line)
        if len(batch) >= BATCH:
            parts.append(_arrow(batch, path, len(lines) - len(batch), lines))
            batch = []
    if batch or not parts:
        parts.append(_arrow(batch, path, len(lines) - len(batch), lines))
    try:
        t = parts[0] if len(parts) == 1 else pa.concat_tables(parts, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise TableError(f"{path}: the records' fields do not have one type each ({e}); fix or regenerate the "
                         f"table") from None
    return duplicate_tokens(table, path, t, lines)


def _arrow(batch: list[dict], path: str, first: int, lines: list[int]) -> pa.Table:
    """A batch of checked records as arrow; a field that still mixes types (one the check does not know) is
    named with the record where arrow gave up."""
    def fails(n: int) -> bool:
        try:
            pa.Table.from_pylist(batch[:n])
            return False
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return True
    try:
        return pa.Table.from_pylist(batch)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        lo, hi = 0, len(batch)  # bisect: the first record that arrow cannot take with the ones before it
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fails(mid) else (mid, hi)
        k = hi - 1
        raise TableError(f"{path}: record {first + k + 1} (line {lines[first + k]}), token {batch[k].get('token')}: "
                         f"a field's type differs from the records before it ({e})") from None


def _check_scenes(path: str, scenes: pa.Table) -> pa.Table:
    if scenes.num_rows == 0:
        raise TableError(f"{path} lists no scenes")
    first: dict[str, str] = {}
    for name, token in zip(scenes["name"].to_pylist(), scenes["token"].to_pylist()):
        if name in first:
            raise TableError(f"{path}: scene name {name!r} appears twice (tokens {first[name]} and {token}); scene "
                             f"names must be unique: fix or regenerate the table")
        first[name] = token
    return scenes


def read_scenes(table_dir: str) -> list[dict]:
    """The records of TABLE_DIR/scene.json, checked like every table (fields, tokens) and with unique names."""
    path = os.path.join(table_dir, "scene.json")
    return _check_scenes(path, read_table_json(path)).to_pylist()


# ---- building -------------------------------------------------------------------------------------

def index_uri(out: str, version: str) -> str:
    return storage.join(out, schema.table_index_path(version))


def _sources(dataroot: str, version: str) -> dict:
    d = os.path.join(dataroot, version)
    if not os.path.isdir(d):
        raise FileNotFoundError(f"no nuScenes tables at {d}: pass --dataroot (the folder holding {version}/, "
                                f"samples/, sweeps/, maps/) and --version")
    out = {}
    for name in PER_SCENE + WHOLE:
        p = os.path.join(d, f"{name}.json")
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p} is missing: a nuScenes table folder has all 13 tables")
        st = os.stat(p)
        out[name] = [st.st_size, st.st_mtime_ns]
    return out


def _lookup(keys: pa.ChunkedArray, tokens: pa.ChunkedArray, values: pa.Array) -> pa.Array:
    """values[position of each key in tokens] (null where a key is not among the tokens)."""
    pos = pc.index_in(keys, value_set=tokens.combine_chunks())
    return pc.take(values, pos)


def _write_parquet(uri: str, write) -> None:
    buf = io.BytesIO()
    write(buf)
    storage.atomic_write(uri, buf.getvalue())


def build_table_index(dataroot: str, version: str, out: str, progress=None) -> str:
    """Stream the tables of DATAROOT/VERSION into the index under OUT; returns its URI. ``progress(name)``, when
    given, is called as each of the 13 tables has been read (the pass takes minutes at trainval scale)."""
    t0 = time.perf_counter()
    src = _sources(dataroot, version)
    uri = index_uri(out, version)
    d = os.path.join(dataroot, version)

    def read_table(name: str) -> pa.Table:
        t = read_table_json(os.path.join(d, f"{name}.json"))
        if progress is not None:
            progress(name)
        return t
    whole = {name: read_table(name) for name in WHOLE}
    scenes = whole["scene"] = _check_scenes(os.path.join(d, "scene.json"), whole["scene"])
    scene_idx = pa.array(range(scenes.num_rows), pa.int32())
    tables: dict[str, pa.Table] = {}

    def add(name: str, scene_of_row: pa.Array) -> None:
        t = tables[name]
        tables[name] = t.append_column(SCENE_COL, scene_of_row.cast(pa.int32()))

    tables["sample"] = read_table("sample")
    add("sample", _lookup(tables["sample"]["scene_token"], scenes["token"], scene_idx))
    tables["sample_data"] = read_table("sample_data")
    add("sample_data", _lookup(tables["sample_data"]["sample_token"], tables["sample"]["token"],
                               tables["sample"][SCENE_COL].combine_chunks()))
    tables["ego_pose"] = read_table("ego_pose")
    add("ego_pose", _lookup(tables["ego_pose"]["token"], tables["sample_data"]["ego_pose_token"],
                            tables["sample_data"][SCENE_COL].combine_chunks()))
    tables["sample_annotation"] = read_table("sample_annotation")
    add("sample_annotation", _lookup(tables["sample_annotation"]["sample_token"], tables["sample"]["token"],
                                     tables["sample"][SCENE_COL].combine_chunks()))
    tables["instance"] = read_table("instance")
    add("instance", _lookup(tables["instance"]["first_annotation_token"], tables["sample_annotation"]["token"],
                            tables["sample_annotation"][SCENE_COL].combine_chunks()))

    row_groups: dict[str, dict[int, int]] = {}
    counts: dict[str, int] = {}
    for name in PER_SCENE:
        t = tables.pop(name)
        t = t.filter(pc.is_valid(t[SCENE_COL]))
        t = t.take(pc.sort_indices(t, [(SCENE_COL, "ascending")]))   # stable: table order within a scene
        counts[name] = t.num_rows
        col = t[SCENE_COL].to_numpy()
        bounds = [0] + [int(i) + 1 for i in (col[1:] != col[:-1]).nonzero()[0]] + [t.num_rows]
        rgs: dict[int, int] = {}

        def write(buf, t=t, bounds=bounds, col=col, rgs=rgs):
            with pq.ParquetWriter(buf, t.schema, compression="zstd") as w:
                for a, b in zip(bounds[:-1], bounds[1:]):
                    if b > a:
                        rgs[int(col[a])] = len(rgs)
                        w.write_table(t.slice(a, b - a), row_group_size=b - a)
        _write_parquet(storage.join(uri, f"{name}.parquet"), write)
        row_groups[name] = rgs
        del t
    for name, t in whole.items():
        _write_parquet(storage.join(uri, f"{name}.parquet"), lambda buf, t=t: pq.write_table(t, buf))
        counts[name] = t.num_rows
    meta = {"format": INDEX_FORMAT, "version": version, "dataroot": os.path.abspath(dataroot), "sources": src,
            "scenes": scenes["name"].to_pylist(), "counts": counts,
            "row_groups": {k: {str(s): g for s, g in v.items()} for k, v in row_groups.items()},
            "seconds": round(time.perf_counter() - t0, 2)}
    storage.atomic_write(storage.join(uri, META_FILE), json.dumps(meta, sort_keys=True).encode())  # last
    return uri


def read_meta(uri: str) -> dict | None:
    p = storage.join(uri, META_FILE)
    return json.loads(storage.read_bytes(p)) if storage.exists(p) else None


def ensure_table_index(dataroot: str, version: str, out: str, progress=None) -> str:
    """The index of DATAROOT/VERSION under OUT, (re)built when missing or older than the tables (``progress``: see
    build_table_index)."""
    src = _sources(dataroot, version)
    uri = index_uri(out, version)
    meta = read_meta(uri)
    if meta and meta.get("format") == INDEX_FORMAT and meta.get("sources") == src \
            and meta.get("dataroot") == os.path.abspath(dataroot):
        return uri
    return build_table_index(dataroot, version, out, progress)


# ---- reading: one scene -------------------------------------------------------------------------

def _parquet(uri: str) -> pq.ParquetFile:
    return pq.ParquetFile(uri if not storage.is_remote(uri) else io.BytesIO(storage.read_bytes(uri)))


def _shared(uri: str) -> tuple[dict, dict]:
    """The index meta and the small tables as records (devkit-decorated), once per process and index content
    (the meta is re-read: a worker must not keep a rebuilt index's old tables)."""
    p = storage.join(uri, META_FILE)
    if not storage.exists(p):
        raise FileNotFoundError(f"no table index at {uri}: build it with pipeline.scenes.tableindex.ensure_table_index")
    return _shared_for(uri, storage.read_bytes(p))


@lru_cache(maxsize=2)
def _shared_for(uri: str, meta_bytes: bytes) -> tuple[dict, dict]:
    meta = json.loads(meta_bytes)
    recs = {name: _parquet(storage.join(uri, f"{name}.parquet")).read().to_pylist() for name in WHOLE}
    log_to_map = {lt: m["token"] for m in recs["map"] for lt in m["log_tokens"]}
    for r in recs["log"]:
        r["map_token"] = log_to_map[r["token"]]
    return meta, recs


@lru_cache(maxsize=16)
def _per_scene_file(uri: str, name: str, sources: str) -> pq.ParquetFile:
    """Opened once per process and index build (the footer lists a row group per scene)."""
    return _parquet(storage.join(uri, f"{name}.parquet"))


def _rows(t: pa.Table) -> list[dict]:
    """Table -> records, column by column (several times faster than Table.to_pylist)."""
    t = t.drop_columns([SCENE_COL])
    names = t.column_names
    return [dict(zip(names, r)) for r in zip(*(c.to_pylist() for c in t.columns))]


class SceneTables:
    """One scene's records behind the devkit calls the scene code makes: ``get(table, token)``,
    ``scene`` (every scene record), ``version``, ``dataroot``; per-scene tables hold this scene only."""

    def __init__(self, uri: str, scene_name: str, dataroot: str | None = None):
        meta, whole = _shared(uri)
        self.version = meta["version"]
        self.dataroot = dataroot or meta["dataroot"]
        self.scene_name = scene_name
        try:
            idx = meta["scenes"].index(scene_name)
        except ValueError:
            raise KeyError(f"scene {scene_name!r} not in {self.version} (table index {uri}, {len(meta['scenes'])} "
                           f"scenes, e.g. {meta['scenes'][:3]})") from None
        for name in WHOLE:
            setattr(self, name, whole[name])
        for name in PER_SCENE:
            rg = meta["row_groups"][name].get(str(idx))
            rows = [] if rg is None else _rows(_per_scene_file(uri, name, json.dumps(meta["sources"])).read_row_group(rg))
            setattr(self, name, rows)
        self._index = {name: {r["token"]: r for r in getattr(self, name)} for name in PER_SCENE + WHOLE}
        self._decorate()

    def _decorate(self) -> None:
        """What NuScenes.__make_reverse_index__ adds, in the same order."""
        for r in self.sample_annotation:
            inst = self.get("instance", r["instance_token"])
            r["category_name"] = self.get("category", inst["category_token"])["name"]
        for r in self.sample_data:
            sensor = self.get("sensor", self.get("calibrated_sensor", r["calibrated_sensor_token"])["sensor_token"])
            r["sensor_modality"], r["channel"] = sensor["modality"], sensor["channel"]
        for r in self.sample:
            r["data"], r["anns"] = {}, []
        for r in self.sample_data:
            if r["is_key_frame"]:
                self.get("sample", r["sample_token"])["data"][r["channel"]] = r["token"]
        for r in self.sample_annotation:
            self.get("sample", r["sample_token"])["anns"].append(r["token"])

    def get(self, table_name: str, token: str) -> dict:
        try:
            return self._index[table_name][token]
        except KeyError:
            if table_name not in self._index:
                raise KeyError(f"table {table_name!r} is not in the table index") from None
            raise KeyError(f"{table_name} token {token!r} not in scene {self.scene_name} of the table index "
                           f"(records of other scenes are not loaded)") from None

    def __repr__(self) -> str:
        return f"SceneTables({self.version}, {self.scene_name}, {len(self.sample_data)} sample_data)"


def scene_names(uri: str) -> list[str]:
    meta, _ = _shared(uri)
    return list(meta["scenes"])
