"""8-class BEV road maps per frame (schema.MAP_CLASSES order, schema.py orientation), at each grid of
``schema.BEV_GRIDS`` (200 x 0.5 m, 400 x 0.25 m: the bucket's height picks one, ``schema.bev_grid``).

Fast path (``bev_fast``): the map-expansion geometry of every layer is rasterised
ONCE per scene on a fine global raster covering all the frames' windows (each layer
one bit of a uint8 image, so one warp samples all eight), then every frame's
rotated G x G window is read with a single ``cv2.warpAffine`` (nearest). The
raster follows the devkit's own drawing rules: per polygon the exterior is filled
and its holes cleared, in record order; polygons the devkit finds invalid are
skipped as it does; lines are drawn ``line_width_m`` wide and read ``line_offset_m``
off, polygons grow by ``polygon_grow_m``, as the devkit's rasteriser makes them (see
BevConfig; all three 0 = the exact geometry at cell centres). The devkit draws in pixels of the
grid, so these three scale with the cell (``BevConfig.for_grid``); one raster serves every grid whose
config rasterises alike.

Reference path (``bev_reference``): ``NuScenesMap.get_map_mask`` per frame, with
the patch centre shifted a quarter metre so that the devkit's pixel centres land on
the schema's cell centres. On shapely 2 the devkit's line rasteriser crashes on
clipped lines that split into a MultiLineString (it iterates the geometry); for
those layers the reference falls back to the devkit's own ``get_map_geom`` clipping
plus the same cv2 drawing call, iterating ``.geoms``.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, replace

import cv2
import numpy as np

from pipeline.contract import schema
from pipeline.contract.geometry import yaw_of_matrix

_SHIFT = 4                       # cv2 fixed-point bits: vertices at 1/16 px
_WINDOW_DIAG_M = schema.BEV_EXTENT_M / np.sqrt(2) + 1.0


@dataclass(frozen=True)
class BevConfig:
    resolution_m: float = 0.1     # global raster pixel; 1/5 of a BEV cell
    line_width_m: float = 1.2     # the devkit draws lines 2 px wide (about 1 m at 0.5 m cells) + rounding
    # The devkit's cv2.fillPoly on rounded vertices marks the boundary cells too, so its polygons are
    # about a quarter metre larger per side than exact cell-centre membership; we grow polygons the same
    # so the masks match devkit-based training data (MagicDrive). 0 = exact cell-centre membership.
    polygon_grow_m: float = 0.25
    # The devkit truncates line vertices to integer pixels (astype(int32)), which moves its lines half a
    # pixel (0.25 m) towards -x and -y of the window; line layers are sampled with the same offset.
    line_offset_m: float = 0.25
    max_raster_px: int = 40_000_000  # larger regions are split into runs of frames

    def for_grid(self, cells: int) -> "BevConfig":
        """This config for a grid of ``cells`` cells over the schema's extent: the devkit-mimicking terms (set
        for 0.5 m cells) scale with the cell; the raster pixel stays (0.1 m is 2/5 of a 0.25 m cell: drivable
        area IoU vs the devkit 0.992 at 400 cells, 0.05 m gives 0.994 at 5x the time; docs/scenes.md)."""
        s = schema.BEV_EXTENT_M / cells / schema.BEV_RESOLUTION_M
        if s == 1.0:
            return self
        return replace(self, line_width_m=self.line_width_m * s, polygon_grow_m=self.polygon_grow_m * s,
                       line_offset_m=self.line_offset_m * s)


@dataclass
class _MapGeometry:
    """Per-layer vertex arrays of one NuScenesMap, built once per process."""
    polygons: dict[str, list[tuple[np.ndarray, list[np.ndarray]]]]   # layer -> [(exterior (P,2), holes)]
    lines: dict[str, list[np.ndarray]]                                # layer -> [(P,2)]
    poly_bbox: dict[str, np.ndarray]                                  # layer -> (M, 4) xmin ymin xmax ymax
    line_bbox: dict[str, np.ndarray]


_GEOMETRY: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _bbox(arrays: list[np.ndarray]) -> np.ndarray:
    if not arrays:
        return np.zeros((0, 4))
    return np.array([[a[:, 0].min(), a[:, 1].min(), a[:, 0].max(), a[:, 1].max()] if len(a) else [np.inf] * 2 +
                      [-np.inf] * 2 for a in arrays])


def map_geometry(nusc_map) -> _MapGeometry:
    """Vertex arrays of the eight layers, cached per NuScenesMap instance (a pipeline/scenes/mapcrop.py MapCrop
    carries its own)."""
    crop = getattr(nusc_map, "bev_geometry", None)
    if crop is not None:
        return crop
    geo = _GEOMETRY.get(nusc_map)
    if geo is not None:
        return geo
    from shapely.geometry import Polygon
    node_idx = {n["token"]: i for i, n in enumerate(nusc_map.node)}
    xy = np.array([[n["x"], n["y"]] for n in nusc_map.node], np.float64).reshape(-1, 2)

    def coords(tokens):
        return xy[[node_idx[t] for t in tokens]] if tokens else np.zeros((0, 2))

    def polygon(token, check_valid):
        rec = nusc_map.get("polygon", token)
        ext = coords(rec["exterior_node_tokens"])
        holes = [coords(h["node_tokens"]) for h in rec["holes"] if h["node_tokens"]]
        if check_valid and not Polygon(ext, holes).is_valid:  # devkit skips these (not for drivable_area)
            return None
        return ext, holes

    polygons, lines = {}, {}
    for layer in schema.MAP_POLYGON_CLASSES:
        if layer == "drivable_area":
            items = [polygon(t, False) for r in nusc_map.drivable_area for t in r["polygon_tokens"]]
        else:
            items = [polygon(r["polygon_token"], True) for r in getattr(nusc_map, layer)]
        polygons[layer] = [p for p in items if p is not None and len(p[0]) >= 3]
    for layer in schema.MAP_LINE_CLASSES:
        lines[layer] = [c for c in (coords(nusc_map.get("line", r["line_token"])["node_tokens"])
                                    for r in getattr(nusc_map, layer)) if len(c) >= 2]
    geo = _MapGeometry(polygons, lines, {k: _bbox([e for e, _ in v]) for k, v in polygons.items()},
                       {k: _bbox(v) for k, v in lines.items()})
    _GEOMETRY[nusc_map] = geo
    return geo


def _window_yaw_centre(lidar2global: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return yaw_of_matrix(lidar2global[:, :3, :3]), lidar2global[:, :2, 3]   # (F,), (F, 2)


def _rasterise(geo: _MapGeometry, x0: float, y0: float, w: int, h: int, cfg: BevConfig) -> np.ndarray:
    """(h, w) uint8, bit c set where MAP_CLASSES[c] covers pixel centre (x0 + u*res, y0 + v*res)."""
    bits = np.zeros((h, w), np.uint8)
    scale = (1 << _SHIFT) / cfg.resolution_m
    region = np.array([x0, y0, x0 + w * cfg.resolution_m, y0 + h * cfg.resolution_m])
    layer = np.zeros((h, w), np.uint8)

    def px(a):
        return np.round((a - (x0, y0)) * scale).astype(np.int32)

    def in_region(bb):
        return np.nonzero((bb[:, 0] <= region[2]) & (bb[:, 2] >= region[0]) &
                          (bb[:, 1] <= region[3]) & (bb[:, 3] >= region[1]))[0]

    thick = max(1, int(round(cfg.line_width_m / cfg.resolution_m)))
    for c, name in enumerate(schema.MAP_CLASSES):
        value = 1 << c
        if name in geo.polygons:
            hit = in_region(geo.poly_bbox[name])
            if not len(hit):
                continue
            layer.fill(0)
            holes = [px(hh) for i in hit for hh in geo.polygons[name][i][1]]
            for i in hit:   # record order, exteriors then holes: the devkit's order of operations
                cv2.fillPoly(layer, [px(geo.polygons[name][i][0])], value, cv2.LINE_8, _SHIFT)
            k = int(round(cfg.polygon_grow_m / cfg.resolution_m))
            grow = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1)) if k > 0 else None
            if grow is not None:
                layer = cv2.dilate(layer, grow)
            if holes:       # the devkit clears a hole's boundary pixels too: holes grow like exteriors
                cut = np.zeros_like(layer)
                cv2.fillPoly(cut, holes, 1, cv2.LINE_8, _SHIFT)
                layer[(cv2.dilate(cut, grow) if grow is not None else cut) > 0] = 0
        else:
            hit = in_region(geo.line_bbox[name])
            if not len(hit):
                continue
            layer.fill(0)
            cv2.polylines(layer, [px(geo.lines[name][i]) for i in hit], False, value, thick, cv2.LINE_8, _SHIFT)
        cv2.bitwise_or(bits, layer, dst=bits)
    return bits


def _frame_runs(centres: np.ndarray, cfg: BevConfig) -> list[slice]:
    """Consecutive frame runs whose raster fits in max_raster_px (one run for a normal scene)."""
    runs, start = [], 0
    lo = hi = centres[0]
    for i in range(1, len(centres)):
        nlo, nhi = np.minimum(lo, centres[i]), np.maximum(hi, centres[i])
        span = (nhi - nlo + 2 * _WINDOW_DIAG_M) / cfg.resolution_m
        if span[0] * span[1] > cfg.max_raster_px:
            runs.append(slice(start, i))
            start, nlo, nhi = i, centres[i], centres[i]
        lo, hi = nlo, nhi
    runs.append(slice(start, len(centres)))
    return runs


def bev_fast_bits(nusc_map, lidar2global: np.ndarray, cfg: BevConfig = BevConfig(),
                  cells: int = schema.BEV_CELLS) -> np.ndarray:
    """(F, 4, 4) LiDAR->global -> (F, G, G) uint8, bit c = MAP_CLASSES[c] (schema orientation), G = ``cells``;
    ``cfg`` is the 0.5 m grid's config, scaled to the grid here (BevConfig.for_grid)."""
    f = lidar2global.shape[0]
    n = cells
    cfg = cfg.for_grid(cells)
    out = np.zeros((f, n, n), np.uint8)
    if f == 0:
        return out
    geo = map_geometry(nusc_map)
    yaw, centre = _window_yaw_centre(lidar2global)
    res = cfg.resolution_m
    cell = schema.BEV_EXTENT_M / cells
    first = -schema.BEV_EXTENT_M / 2 + cell / 2   # x of column 0, and -(y of row 0)
    line_bits = np.uint8(sum(1 << schema.MAP_CLASSES.index(k) for k in schema.MAP_LINE_CLASSES))
    for run in _frame_runs(centre, cfg):
        # the raster lattice is anchored at global multiples of res, so a frame's mask does not depend
        # on which other frames share its raster
        lo = np.floor((centre[run].min(0) - _WINDOW_DIAG_M) / res) * res
        hi = centre[run].max(0) + _WINDOW_DIAG_M
        w, h = (np.ceil((hi - lo) / res).astype(int) + 1)
        bits = _rasterise(geo, lo[0], lo[1], int(w), int(h), cfg)
        for i in range(run.start, run.stop):
            c, s = np.cos(yaw[i]), np.sin(yaw[i])
            # dst (col j, row i) -> lidar x = first + cell j, y = -first - cell i -> global -> raster (u, v)
            m = np.array([[c * cell, s * cell, c * first + s * first + centre[i, 0] - lo[0]],
                          [s * cell, -c * cell, s * first - c * first + centre[i, 1] - lo[1]]]) / res
            win = cv2.warpAffine(bits, m, (n, n), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP, borderValue=0)
            if cfg.line_offset_m:   # lines read a quarter metre further along +x, +y of the window
                d = cfg.line_offset_m
                m[:, 2] += np.array([c * d - s * d, s * d + c * d]) / res
                lines = cv2.warpAffine(bits, m, (n, n), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                                       borderValue=0)
                win = (win & ~line_bits) | (lines & line_bits)
            out[i] = win
    return out


def bits_to_packed(bits: np.ndarray) -> np.ndarray:
    """(F, G, G) bitfield -> (F, 8, G, G/8) uint8, schema.pack_bev layout."""
    out = np.empty(bits.shape[:1] + (len(schema.MAP_CLASSES), bits.shape[1], schema.bev_packed_cols(bits.shape[2])),
                   np.uint8)
    for c in range(len(schema.MAP_CLASSES)):
        out[:, c] = np.packbits(bits & (1 << c), axis=-1)   # packbits treats any non-zero byte as 1
    return out


def bits_to_masks(bits: np.ndarray) -> np.ndarray:
    """(F, G, G) bitfield -> (F, 8, G, G) bool."""
    return np.stack([(bits & (1 << c)) != 0 for c in range(len(schema.MAP_CLASSES))], 1)


def bev_fast(nusc_map, lidar2global: np.ndarray, cfg: BevConfig = BevConfig(),
             cells: int = schema.BEV_CELLS) -> np.ndarray:
    """(F, 4, 4) LiDAR->global -> (F, 8, G, G) bool masks."""
    return bits_to_masks(bev_fast_bits(nusc_map, lidar2global, cfg, cells))


def _lines_mask(geoms, canvas: int) -> np.ndarray:
    """The devkit's mask_for_lines, iterating MultiLineString parts (shapely 2)."""
    from shapely import affinity
    mask = np.zeros((canvas, canvas), np.uint8)
    half = schema.BEV_EXTENT_M / 2
    for line in geoms:
        line = affinity.scale(affinity.affine_transform(line, [1, 0, 0, 1, half, half]),
                              xfact=canvas / schema.BEV_EXTENT_M, yfact=canvas / schema.BEV_EXTENT_M, origin=(0, 0))
        parts = line.geoms if hasattr(line, "geoms") else [line]
        for part in parts:
            coords = np.asarray(part.coords, np.int32).reshape(-1, 2)
            if len(coords):
                cv2.polylines(mask, [coords], False, 1, 2)
    return mask


def bev_reference(nusc_map, lidar2global: np.ndarray, cells: int = schema.BEV_CELLS) -> np.ndarray:
    """Per-frame devkit ``get_map_mask`` at a canvas of ``cells`` pixels -> (F, 8, G, G) bool, schema orientation."""
    f = lidar2global.shape[0]
    n = cells
    out = np.zeros((f, len(schema.MAP_CLASSES), n, n), bool)
    yaw, centre = _window_yaw_centre(lidar2global)
    q = schema.BEV_EXTENT_M / cells / 2
    explorer = nusc_map.explorer
    for i in range(f):
        c, s = np.cos(yaw[i]), np.sin(yaw[i])
        # the devkit's pixel k sits at -50 + r k; the schema's cell k at -50 + r (k + 0.5): shift by q = r / 2
        box = (centre[i, 0] + c * q - s * q, centre[i, 1] + s * q + c * q, schema.BEV_EXTENT_M, schema.BEV_EXTENT_M)
        angle = float(np.degrees(yaw[i]))
        try:
            masks = nusc_map.get_map_mask(box, angle, list(schema.MAP_CLASSES), (n, n))
        except TypeError:  # shapely-2 MultiLineString in mask_for_lines: draw the line layers ourselves
            masks = np.zeros((len(schema.MAP_CLASSES), n, n), np.uint8)
            for ch, name in enumerate(schema.MAP_CLASSES):
                if name in schema.MAP_LINE_CLASSES:
                    masks[ch] = _lines_mask(explorer.get_map_geom(box, angle, [name])[0][1], n)
                else:
                    masks[ch] = nusc_map.get_map_mask(box, angle, [name], (n, n))[0]
        out[i] = masks[:, ::-1, :] > 0   # devkit rows grow with y (behind first); schema row 0 is ahead
    return out


def per_class_iou(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """IoU per MAP_CLASSES channel over all frames of (F, 8, H, W) masks (NaN where both are empty)."""
    inter = (a & b).sum(axis=(0, 2, 3))
    union = (a | b).sum(axis=(0, 2, 3))
    return {name: (float(inter[c] / union[c]) if union[c] else float("nan"))
            for c, name in enumerate(schema.MAP_CLASSES)}


def bev_grids_packed(nusc_map, lidar2global: np.ndarray, cfg: BevConfig = BevConfig(),
                     grids: tuple = schema.BEV_GRIDS) -> dict[int, np.ndarray]:
    """{G: (F, 8, G, G/8) uint8} of every grid (cells, cell_m) in ``grids``: what a scene store keeps."""
    return {int(cells): bits_to_packed(bev_fast_bits(nusc_map, lidar2global, cfg, int(cells))) for cells, _ in grids}
