"""Per-scene map crops: each map-expansion JSON read once per job, cut to each scene's area.

A ``NuScenesMap`` per Ray worker costs several GB for a large map (the trainval-sized synthetic
map is 400 MB of JSON), so the driver streams each map once (pipeline/scenes/jsonstream.py; node tokens
kept as a sorted fixed-width array, not a dict), builds the same per-layer vertex arrays as
``bevmap.map_geometry`` (same records, same order, same validity rule), and cuts them to the
elements whose bounding box meets the scene's ego positions grown by the BEV window's diagonal
plus a margin: every element a BEV raster of the scene can touch. ``bevmap.bev_fast_bits`` takes
a ``MapCrop`` where it takes a ``NuScenesMap`` and gives the same masks (tests/test_tables_index.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from pipeline.contract import schema, storage
from pipeline.scenes.bevmap import _WINDOW_DIAG_M, _MapGeometry, _bbox
from pipeline.scenes.jsonstream import iter_json_object

MARGIN_M = 20.0   # beyond the BEV diagonal: the lidar's offset from the ego origin, polygon growth, rounding


@dataclass
class MapCrop:
    """What the BEV code needs of one scene's map: its name and the eight layers' geometry near the scene."""
    map_name: str
    bev_geometry: _MapGeometry


def load_geometry(path: str) -> _MapGeometry:
    """bevmap.map_geometry of the map at ``path`` without a NuScenesMap: two streaming passes."""
    from shapely.geometry import Polygon
    toks, xy = [], []
    for _, n in iter_json_object(path, {"node"}):
        toks.append(n["token"])
        xy.append((n["x"], n["y"]))
    tok = np.array(toks, dtype="S")
    order = np.argsort(tok, kind="stable")
    tok, xy = tok[order], np.asarray(xy, np.float64).reshape(-1, 2)[order]
    del toks

    def coords(tokens):
        if not tokens:
            return np.zeros((0, 2))
        q = np.array(tokens, dtype=tok.dtype)
        i = np.searchsorted(tok, q)
        if (i >= len(tok)).any() or (tok[np.minimum(i, len(tok) - 1)] != q).any():
            raise ValueError(f"{path}: a polygon or line names a node that is not in the node table")
        return xy[i]

    layers = set(schema.MAP_POLYGON_CLASSES) | set(schema.MAP_LINE_CLASSES)
    polys, lines, recs = {}, {}, {k: [] for k in layers}
    for key, v in iter_json_object(path, {"polygon", "line"} | layers):
        if key == "polygon":
            polys[v["token"]] = (coords(v["exterior_node_tokens"]),
                                 [coords(h["node_tokens"]) for h in v["holes"] if h["node_tokens"]])
        elif key == "line":
            lines[v["token"]] = coords(v["node_tokens"])
        else:
            recs[key].append(v)

    def polygon(token, check_valid):
        ext, holes = polys[token]
        if check_valid and not Polygon(ext, holes).is_valid:  # as map_geometry (the devkit skips these)
            return None
        return ext, holes

    pg, ln = {}, {}
    for layer in schema.MAP_POLYGON_CLASSES:
        if layer == "drivable_area":
            items = [polygon(t, False) for r in recs[layer] for t in r["polygon_tokens"]]
        else:
            items = [polygon(r["polygon_token"], True) for r in recs[layer]]
        pg[layer] = [p for p in items if p is not None and len(p[0]) >= 3]
    for layer in schema.MAP_LINE_CLASSES:
        ln[layer] = [c for c in (lines[r["line_token"]] for r in recs[layer]) if len(c) >= 2]
    return _MapGeometry(pg, ln, {k: _bbox([e for e, _ in v]) for k, v in pg.items()},
                        {k: _bbox(v) for k, v in ln.items()})


def crop(geo: _MapGeometry, map_name: str, xy: np.ndarray) -> MapCrop:
    """The elements of ``geo`` a BEV window centred anywhere in the (P, 2) ego positions ``xy`` can touch."""
    lo, hi = xy.min(0) - _WINDOW_DIAG_M - MARGIN_M, xy.max(0) + _WINDOW_DIAG_M + MARGIN_M

    def keep(bb):
        return np.nonzero((bb[:, 0] <= hi[0]) & (bb[:, 2] >= lo[0]) & (bb[:, 1] <= hi[1]) & (bb[:, 3] >= lo[1]))[0]

    pk = {k: keep(b) for k, b in geo.poly_bbox.items()}
    lk = {k: keep(b) for k, b in geo.line_bbox.items()}
    return MapCrop(map_name, _MapGeometry({k: [geo.polygons[k][i] for i in pk[k]] for k in geo.polygons},
                                          {k: [geo.lines[k][i] for i in lk[k]] for k in geo.lines},
                                          {k: geo.poly_bbox[k][pk[k]].reshape(-1, 4) for k in geo.poly_bbox},
                                          {k: geo.line_bbox[k][lk[k]].reshape(-1, 4) for k in geo.line_bbox}))


@lru_cache(maxsize=4)
def _cached_geometry(path: str, size: int, mtime_ns: int) -> _MapGeometry:
    """Once per driver process and map file version (a notebook or test running several builds)."""
    return load_geometry(path)


class MapCropper:
    """Each map the scenes use, streamed once into geometry; ``crop(scene)`` cuts one scene's part (cheap), so
    crops can be made as tasks are submitted and only the in-flight ones exist at a time."""

    def __init__(self, index: str, dataroot: str, scene_names: list[str]):
        import os
        from pipeline.scenes.tableindex import _parquet, _shared
        meta, whole = _shared(index)
        location = {r["token"]: r["location"] for r in whole["log"]}
        wanted = set(scene_names)
        self.map_of = {s["name"]: location[s["log_token"]] for s in whole["scene"] if s["name"] in wanted}
        self.idx = {n: i for i, n in enumerate(meta["scenes"])}
        self.row_group = meta["row_groups"]["ego_pose"]
        self.ego = _parquet(storage.join(index, "ego_pose.parquet"))
        self.geo: dict[str, _MapGeometry] = {}
        for map_name in sorted(set(self.map_of.values())):
            path = os.path.join(dataroot, "maps", "expansion", f"{map_name}.json")
            if os.path.exists(path):   # else no crop: each of its scenes fails (quarantined) saying the map is missing
                st = os.stat(path)
                self.geo[map_name] = _cached_geometry(path, st.st_size, st.st_mtime_ns)

    def crop(self, scene_name: str) -> MapCrop | None:
        """None for a scene without poses or map (its task then fails with the scene code's own error)."""
        rg = self.row_group.get(str(self.idx.get(scene_name, -1)))
        if rg is None or self.map_of.get(scene_name) not in self.geo:
            return None
        t = self.ego.read_row_group(rg, columns=["translation"])
        xy = np.asarray(t["translation"].combine_chunks().flatten()).reshape(-1, 3)[:, :2]   # (P, 2)
        return crop(self.geo[self.map_of[scene_name]], self.map_of[scene_name], xy)
