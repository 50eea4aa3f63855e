"""Camera images of the synthetic world: sky, ground, map layers, and objects as filled 3D boxes.

Geometry is exactly the one in the written tables (the caller passes the intrinsics and the
global -> camera transform it wrote), so a box projected through the devkit lands on its drawing.
Rendering is vectorised per polygon (cv2.fillPoly); polygons crossing the camera plane are clipped
against a near plane first so nothing behind the camera wraps around.

Palette (RGB) of the object classes, also exposed as CLASS_COLORS:

| class                | RGB             |
|----------------------|-----------------|
| car                  | (0, 120, 255)   |
| truck                | (255, 128, 0)   |
| construction_vehicle | (140, 70, 0)    |
| bus                  | (255, 0, 255)   |
| trailer              | (0, 200, 200)   |
| barrier              | (255, 0, 0)     |
| motorcycle           | (130, 0, 255)   |
| bicycle              | (0, 230, 0)     |
| pedestrian           | (255, 90, 170)  |
| traffic_cone         | (255, 255, 0)   |
| (unmapped category)  | (150, 150, 205) |

Faces are shaded by a fixed sun direction (factor 0.55..1.0 of the class colour); the front face
(the box's +x / heading side) is mixed 35 % towards white so the heading is visible; edges are
drawn dark.
"""
from __future__ import annotations

import cv2
import numpy as np

from pipeline.contract.geometry import BOX_FACES, box_corners, invert_transform, project, transform_points
from pipeline.synth.world import Band, Line, Road

CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    "car": (0, 120, 255), "truck": (255, 128, 0), "construction_vehicle": (140, 70, 0),
    "bus": (255, 0, 255), "trailer": (0, 200, 200), "barrier": (255, 0, 0),
    "motorcycle": (130, 0, 255), "bicycle": (0, 230, 0), "pedestrian": (255, 90, 170),
    "traffic_cone": (255, 255, 0),
}
OTHER_COLOR = (150, 150, 205)
SKY_TOP, SKY_HORIZON = (110, 160, 220), (200, 220, 240)
MAP_COLORS: dict[str, tuple[int, int, int]] = {
    "ground": (95, 112, 80), "drivable_area": (82, 82, 88), "carpark_area": (110, 104, 98),
    "walkway": (172, 162, 142), "ped_crossing": (235, 235, 235), "stop_line": (235, 235, 235),
    "lane_divider": (235, 235, 235), "road_divider": (225, 185, 50),
}
FRONT_TINT = 0.35
EDGE_COLOR = (25, 25, 25)
NEAR = 0.3            # near clipping plane [m]
DRAW_RANGE = 160.0    # map drawn up to this arc length ahead/behind the camera [m]
_SUN = np.array([0.45, 0.35, 0.82]) / np.linalg.norm([0.45, 0.35, 0.82])
_SHIFT = 3            # fillPoly sub-pixel bits
_LAYER_ORDER = ("drivable_area", "carpark_area", "walkway", "ped_crossing", "stop_line", "lane_divider",
                "road_divider")


def shade_variants(rgb: tuple[int, int, int]) -> np.ndarray:
    """(K, 3) colours a face of this class colour can be drawn with (for pixel tests)."""
    c = np.asarray(rgb, np.float64)
    shades = [c * f for f in np.linspace(0.55, 1.0, 10)]
    shades += [s * (1 - FRONT_TINT) + 255 * FRONT_TINT for s in list(shades)]
    return np.clip(np.round(shades), 0, 255)


def clip_near(poly: np.ndarray, near: float = NEAR) -> np.ndarray:
    """Sutherland-Hodgman clip of one (K, 3) camera-frame polygon to z >= near, vectorised."""
    inside = poly[:, 2] >= near
    if inside.all():
        return poly
    if not inside.any():
        return poly[:0]
    nxt = np.roll(poly, -1, 0)
    nin = np.roll(inside, -1)
    zi, zn = poly[:, 2], nxt[:, 2]
    alpha = np.where(inside != nin, (near - zi) / np.where(zn == zi, 1.0, zn - zi), 0.0)
    cross = poly + alpha[:, None] * (nxt - poly)
    cand = np.stack([poly, cross], 1).reshape(-1, 3)             # (2K, 3): vertex, then edge crossing
    keep = np.stack([inside, inside != nin], 1).reshape(-1)
    return cand[keep]


def _to_px(points_cam: np.ndarray, k: np.ndarray) -> np.ndarray:
    uv, _ = project(points_cam, k)
    return np.round(uv * (1 << _SHIFT)).astype(np.int32)


def _fill(img: np.ndarray, polys: list[np.ndarray], rgb: tuple[int, int, int]) -> None:
    if polys:
        cv2.fillPoly(img, polys, (int(rgb[2]), int(rgb[1]), int(rgb[0])), lineType=cv2.LINE_8, shift=_SHIFT)


class SceneArt:
    """Ground geometry of one scene, prepared once: long bands as polygons, markings as quads."""

    def __init__(self, road: Road, elements: list[Band | Line]):
        self.road = road
        # long bands: (layer, s grid, right edge (n, 2), left edge (n, 2)) sampled every 2 m once;
        # each image takes the slice near the camera
        self.bands: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
        self.holes: dict[str, list[np.ndarray]] = {}   # layer -> (K, 3) global polygons drawn as ground
        quads: dict[str, list[np.ndarray]] = {}
        for el in elements:
            if isinstance(el, Band) and el.layer in ("drivable_area", "carpark_area", "walkway"):
                ss = np.linspace(el.s0, el.s1, max(2, int(np.ceil((el.s1 - el.s0) / 2.0)) + 1))
                self.bands.append((el.layer, ss, road.frame(ss, min(el.d0, el.d1))[0],
                                   road.frame(ss, max(el.d0, el.d1))[0]))
                for h in el.holes:
                    poly = road.band(*h)
                    self.holes.setdefault(el.layer, []).append(np.concatenate([poly, np.zeros((len(poly), 1))], 1))
            elif isinstance(el, Band) and el.layer == "ped_crossing":  # zebra stripes across the road
                for d in np.arange(el.d0 + 0.3, el.d1 - 0.3, 1.2):
                    quads.setdefault(el.layer, []).append(self._quad(el.s0, el.s1, d, d + 0.6))
            elif isinstance(el, Band) and el.layer == "stop_line":
                quads.setdefault(el.layer, []).append(self._quad(el.s0, el.s1, el.d0, el.d1))
            elif isinstance(el, Line) and el.layer == "lane_divider":  # 3 m dashes every 9 m
                for s in np.arange(el.s0, el.s1 - 3.0, 9.0):
                    quads.setdefault(el.layer, []).append(self._quad(s, s + 3.0, el.d - 0.075, el.d + 0.075))
            elif isinstance(el, Line) and el.layer == "road_divider":  # solid double line
                for s in np.arange(el.s0, el.s1 - 1e-6, 2.0):
                    for d in (-0.2, 0.08):
                        quads.setdefault(el.layer, []).append(
                            self._quad(s, min(s + 2.0, el.s1), d, d + 0.12))
        # (N, 4, 3) global quads and the arc length of each, per layer
        self.quads = {k: np.stack(v) for k, v in quads.items()}
        self.quad_s = {k: self._arc_of(v) for k, v in self.quads.items()}

    def _quad(self, s0: float, s1: float, d0: float, d1: float) -> np.ndarray:
        pts = np.stack([self.road.frame(s0, d0)[0], self.road.frame(s1, d0)[0],
                        self.road.frame(s1, d1)[0], self.road.frame(s0, d1)[0]])
        return np.concatenate([pts, np.full((4, 1), 0.01)], 1)  # just above the road surface

    def _arc_of(self, quads: np.ndarray) -> np.ndarray:
        centre = quads[:, :, :2].mean(1)
        dist = np.linalg.norm(self.road.xy[None, ::8] - centre[:, None], axis=-1)
        return self.road.s[::8][np.argmin(dist, 1)]


_SKY_CACHE: dict[tuple[int, int], np.ndarray] = {}


def sky_background(width: int, height: int) -> np.ndarray:
    if (width, height) not in _SKY_CACHE:
        t = np.linspace(0.0, 1.0, height)[:, None]
        rgb = np.asarray(SKY_TOP) * (1 - t) + np.asarray(SKY_HORIZON) * t  # (H, 3)
        sky = np.broadcast_to(np.round(rgb[:, ::-1]).astype(np.uint8)[:, None], (height, width, 3))
        _SKY_CACHE[(width, height)] = np.ascontiguousarray(sky)
    return _SKY_CACHE[(width, height)].copy()


def render_view(art: SceneArt, cam_s: float, global2cam: np.ndarray, k: np.ndarray, width: int, height: int,
                boxes: np.ndarray, colors: list[tuple[int, int, int]]) -> np.ndarray:
    """One (H, W, 3) BGR uint8 image.

    cam_s: arc length of the ego (culls the map); global2cam (4, 4); k (3, 3); boxes (N, 7) global."""
    img = sky_background(width, height)
    cam_pos = invert_transform(global2cam)[:3, 3]
    ground = np.array([[-400, -400], [400, -400], [400, 400], [-400, 400]], np.float64) + cam_pos[:2]
    _draw_ground_poly(img, np.concatenate([ground, np.zeros((4, 1))], 1), global2cam, k, MAP_COLORS["ground"])
    for layer in _LAYER_ORDER:
        for name, ss, right, left in art.bands:
            if name != layer:
                continue
            sel = np.flatnonzero(np.abs(ss - cam_s) < DRAW_RANGE)
            if len(sel) < 2:
                continue
            poly = np.concatenate([right[sel], left[sel][::-1]], 0)
            _draw_ground_poly(img, np.concatenate([poly, np.zeros((len(poly), 1))], 1), global2cam, k,
                              MAP_COLORS[layer])
        for hole in art.holes.get(layer, ()):
            _draw_ground_poly(img, hole, global2cam, k, MAP_COLORS["ground"])
        if layer in art.quads:
            sel = np.abs(art.quad_s[layer] - cam_s) < DRAW_RANGE
            cam = transform_points(global2cam, art.quads[layer][sel])  # (M, 4, 3)
            front = (cam[..., 2] >= NEAR).all(-1)
            _fill(img, list(_to_px(cam[front], k)), MAP_COLORS[layer])
    _draw_boxes(img, boxes, colors, global2cam, k, width, height)
    return img


def _draw_ground_poly(img: np.ndarray, poly_global: np.ndarray, global2cam: np.ndarray, k: np.ndarray,
                      rgb: tuple[int, int, int]) -> None:
    poly = clip_near(transform_points(global2cam, poly_global))
    if len(poly) >= 3:
        _fill(img, [_to_px(poly, k)], rgb)


def _draw_boxes(img: np.ndarray, boxes: np.ndarray, colors: list[tuple[int, int, int]], global2cam: np.ndarray,
                k: np.ndarray, width: int, height: int) -> None:
    if len(boxes) == 0:
        return
    corners = transform_points(global2cam, box_corners(boxes))      # (N, 8, 3) camera frame
    centre = corners.mean(1)                                         # (N, 3)
    faces = corners[:, np.asarray(BOX_FACES)]                        # (N, 6, 4, 3)
    face_c = faces.mean(2)                                           # (N, 6, 3)
    normal = face_c - centre[:, None]                                # outward, boxes are convex
    visible = np.einsum("nfi,nfi->nf", normal, face_c) < 0           # facing the camera
    # lambert shading needs global normals: rotate back from the camera frame
    rot_c2g = global2cam[:3, :3].T
    n_glob = np.einsum("ij,nfj->nfi", rot_c2g, normal)
    n_glob /= np.linalg.norm(n_glob, axis=-1, keepdims=True) + 1e-12
    shade = 0.55 + 0.45 * np.clip(n_glob @ _SUN, 0, 1)              # (N, 6)
    uv, depth = project(corners, k)
    in_front = depth >= NEAR
    off = (~in_front).all(1)
    for axis, lim in ((0, width), (1, height)):
        off |= (in_front & (uv[..., axis] < 0)).sum(1) == in_front.sum(1)
        off |= (in_front & (uv[..., axis] >= lim)).sum(1) == in_front.sum(1)
    order = np.argsort(-np.linalg.norm(centre, axis=1), kind="stable")  # painter's: far first
    # face colours (N, 6, 3) BGR: class colour x sun shade, the front face (+x, index 2) tinted
    rgb = np.asarray(colors, np.float64)[:, None] * shade[..., None]
    rgb[:, 2] = rgb[:, 2] * (1 - FRONT_TINT) + 255 * FRONT_TINT
    bgr = np.clip(np.round(rgb[..., ::-1]), 0, 255).astype(int).tolist()
    face_idx = np.asarray(BOX_FACES)
    px_all = np.round(np.where(in_front[..., None], uv, 0) * (1 << _SHIFT)).astype(np.int32)  # (N, 8, 2)
    edge_bgr = EDGE_COLOR[::-1]
    for n in order:
        if off[n]:
            continue
        all_front = bool(in_front[n].all())
        outlines = []
        for f in np.flatnonzero(visible[n]):
            if all_front:  # the common case: no clipping, reuse the projected corners
                px = px_all[n, face_idx[f]]
            else:
                poly = clip_near(faces[n, f])
                if len(poly) < 3:
                    continue
                px = _to_px(poly, k)
            cv2.fillPoly(img, [px], tuple(bgr[n][f]), lineType=cv2.LINE_8, shift=_SHIFT)
            outlines.append(px)
        if outlines:
            cv2.polylines(img, outlines, True, edge_bgr, 1, lineType=cv2.LINE_8, shift=_SHIFT)
