"""Helpers for the scene-processing tests: a minimal map-expansion JSON the real devkit loads,
and private copies of the synthetic dataset that a test may damage."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

LAYERS = ("drivable_area", "road_segment", "road_block", "lane", "ped_crossing", "walkway", "stop_line",
          "carpark_area", "road_divider", "lane_divider", "traffic_light", "lane_connector")


def write_map(root: Path, map_name: str, polygons: dict[str, list[np.ndarray]],
              lines: dict[str, list[np.ndarray]] | None = None) -> Path:
    """maps/expansion/<map_name>.json with the given global-frame polygons (P, 2) (or (exterior, [holes]))
    and lines per layer."""
    doc = {"version": "1.3", "canvas_edge": [3000.0, 3000.0], "node": [], "polygon": [], "line": [],
           "arcline_path_3": {}, "connectivity": {}, **{layer: [] for layer in LAYERS}}

    def nodes(pts):
        toks = []
        for x, y in np.asarray(pts, float):
            toks.append(f"n{len(doc['node'])}")
            doc["node"].append({"token": toks[-1], "x": float(x), "y": float(y)})
        return toks

    for layer, polys in polygons.items():
        for i, p in enumerate(polys):
            p, holes = p if isinstance(p, tuple) else (p, [])      # (exterior, [hole, ...]) or exterior
            ptok = f"p{len(doc['polygon'])}"
            doc["polygon"].append({"token": ptok, "exterior_node_tokens": nodes(p),
                                   "holes": [{"node_tokens": nodes(h)} for h in holes]})
            rec = {"token": f"{layer}{i}"}
            if layer == "drivable_area":
                rec["polygon_tokens"] = [ptok]
            else:
                rec["polygon_token"] = ptok
            if layer == "stop_line":
                rec.update(stop_line_type="STOP_SIGN", ped_crossing_tokens=[], traffic_light_tokens=[])
            doc[layer].append(rec)
    for layer, ls in (lines or {}).items():
        for i, p in enumerate(ls):
            ltok = f"l{len(doc['line'])}"
            doc["line"].append({"token": ltok, "node_tokens": nodes(p)})
            doc[layer].append({"token": f"{layer}{i}", "line_token": ltok})
    path = root / "maps" / "expansion" / f"{map_name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def copy_dataset(src: Path, dst: Path) -> Path:
    """A private copy (tables and maps copied, image files hard-linked) that a test may damage."""
    def link(s, d):
        try:
            Path(d).hardlink_to(s)
        except OSError:
            shutil.copy2(s, d)
    shutil.copytree(src, dst, copy_function=link)
    for p in dst.rglob("*.json"):  # tables are rewritten by tests: break the hard links
        data = p.read_bytes()
        p.unlink()
        p.write_bytes(data)
    return dst
