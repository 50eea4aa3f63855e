"""The continuous-time world of the synthetic nuScenes writer: sensor rig, road, ego, objects, map.

Everything here is a closed-form function of time so that the truth at any camera timestamp is
exact (the annotations are only samples of it at the keyframes). Coordinates are nuScenes global
metres (x east, y north, z up, ground at z = 0); yaws are about +z from +x.

The road is a curve C(s) parametrised by arc length s with a smooth curvature profile; every map
element and every object placement is expressed as (s, d) along it, d = signed offset to the
left of the direction of travel. The ego drives in the right lane (d = EGO_OFFSET).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.contract.geometry import make_transform, quat_to_matrix, yaw_to_quat

# ---- sensor rig (values close to the real nuScenes rig, scene-0061) ------------------------------

REF_IMAGE_SIZE = (1600, 900)
CAMERA_PERIOD_US = 1_000_000 / 12  # 12 Hz camera shutter
LIDAR_PERIOD_US = 50_000           # 20 Hz lidar sweep
FRAME_JITTER_US = 1_500            # per-frame trigger jitter, uniform +-

# channel: (yaw in ego frame [deg], translation in ego frame [m], fx at 1600x900, cx, cy,
#           shutter offset vs CAM_FRONT [us]; the cameras fire as the lidar sweeps past them)
CAMERA_RIG: dict[str, tuple[float, tuple[float, float, float], float, float, float, int]] = {
    "CAM_FRONT":       (0.0,    (1.70, 0.02, 1.51), 1266.4, 816.3, 491.5, 0),
    "CAM_FRONT_RIGHT": (-55.0,  (1.55, -0.49, 1.50), 1260.8, 807.97, 495.3, 7_900),
    "CAM_BACK_RIGHT":  (-110.0, (1.04, -0.81, 1.56), 1259.5, 807.3, 501.2, 15_400),
    "CAM_BACK":        (180.0,  (0.03, 0.00, 1.57), 809.2, 829.2, 481.8, 25_100),
    "CAM_BACK_LEFT":   (110.0,  (1.05, 0.81, 1.56), 1256.7, 817.8, 451.9, 35_000),
    "CAM_FRONT_LEFT":  (55.0,   (1.52, 0.49, 1.51), 1272.6, 826.6, 479.8, -7_600),
}
LIDAR_TRANSLATION = (0.943713, 0.0, 1.84023)
LIDAR_YAW = -np.pi / 2             # lidar x = right of the car, y = forward
LIDAR_OFFSET_US = 35_500           # keyframe lidar timestamp vs CAM_FRONT keyframe

# The real rig (nuscenes-devkit issues #1004, #1025, #1100): the 20 Hz lidar triggers the cameras as it
# sweeps past them, 12 exposures per 20 sweeps, so CAM_FRONT rounds are 1 or 2 sweeps apart (50 or
# 100 ms) in the repeating pattern below; each camera fires at its CAMERA_RIG offset in that round.
TRIGGER_SWEEPS = (2, 2, 1)         # lidar sweeps between consecutive camera rounds (sum 5 -> 3 rounds)
ROUND_JITTER_US = 300              # per-round trigger jitter, uniform +- (and per image)
# mount tilts [deg] (roll about the ego x axis, pitch about the ego y axis) of the real rig's order
CAMERA_TILT_DEG: dict[str, tuple[float, float]] = {
    "CAM_FRONT": (0.6, -0.8), "CAM_FRONT_RIGHT": (-0.7, 0.5), "CAM_BACK_RIGHT": (0.9, 0.6),
    "CAM_BACK": (-0.5, -0.9), "CAM_BACK_LEFT": (0.8, -0.6), "CAM_FRONT_LEFT": (-0.6, 0.7)}
LIDAR_TILT_DEG = (0.7, -0.5)


def tilt_matrix(roll_deg: float, pitch_deg: float) -> np.ndarray:
    """(3, 3) small mount tilt in the ego frame: pitch about y after roll about x."""
    r, p = np.deg2rad(roll_deg), np.deg2rad(pitch_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(r), -np.sin(r)], [0, np.sin(r), np.cos(r)]])
    ry = np.array([[np.cos(p), 0, np.sin(p)], [0, 1, 0], [-np.sin(p), 0, np.cos(p)]])
    return ry @ rx

# camera axes (x right, y down, z forward) expressed in a forward-looking ego frame
_CAM_BASE = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def camera_rotation(channel: str, tilted: bool = True) -> np.ndarray:
    """(3, 3) camera -> ego rotation (with the mount's roll/pitch unless ``tilted`` is False)."""
    yaw = np.deg2rad(CAMERA_RIG[channel][0])
    tilt = tilt_matrix(*CAMERA_TILT_DEG[channel]) if tilted else np.eye(3)
    return tilt @ quat_to_matrix(yaw_to_quat(yaw)) @ _CAM_BASE


def lidar_rotation(tilted: bool = True) -> np.ndarray:
    """(3, 3) LIDAR_TOP -> ego rotation (x right, y forward; with the mount's roll/pitch)."""
    tilt = tilt_matrix(*LIDAR_TILT_DEG) if tilted else np.eye(3)
    return tilt @ quat_to_matrix(yaw_to_quat(LIDAR_YAW))


def camera_intrinsics(channel: str, width: int, height: int) -> np.ndarray:
    """(3, 3) intrinsics scaled from the 1600x900 rig to width x height."""
    _, _, f, cx, cy, _ = CAMERA_RIG[channel]
    sx, sy = width / REF_IMAGE_SIZE[0], height / REF_IMAGE_SIZE[1]
    return np.array([[f * sx, 0.0, cx * sx], [0.0, f * sy, cy * sy], [0.0, 0.0, 1.0]])


def camera_to_ego(channel: str, tilted: bool = True) -> np.ndarray:
    return make_transform(camera_rotation(channel, tilted), CAMERA_RIG[channel][1])


def trigger_rounds(rng: np.random.Generator, num_frames: int) -> np.ndarray:
    """(num_frames,) lidar sweep index of each camera round: steps of TRIGGER_SWEEPS from a random phase."""
    phase = int(rng.integers(len(TRIGGER_SWEEPS)))
    steps = np.resize(np.roll(TRIGGER_SWEEPS, -phase), max(num_frames - 1, 0))
    return np.concatenate([[0], np.cumsum(steps)]).astype(np.int64)


# ---- road --------------------------------------------------------------------------------------

EGO_OFFSET = -1.75    # right lane centre
ROAD_HALF_WIDTH = 7.0  # two lanes each way, 3.5 m each
ROAD_STEP = 0.25       # arc-length grid of the road polyline [m]


@dataclass
class Road:
    s: np.ndarray        # (M,) arc length, ascending
    xy: np.ndarray       # (M, 2) centre line
    heading: np.ndarray  # (M,) tangent direction
    kappa: np.ndarray    # (M,) curvature [1/m]

    def frame(self, s: np.ndarray, d: np.ndarray | float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Points at arc length s and left offset d -> ((..., 2) xy, (...) heading)."""
        s = np.asarray(s, np.float64)
        x = np.interp(s, self.s, self.xy[:, 0])
        y = np.interp(s, self.s, self.xy[:, 1])
        th = np.interp(s, self.s, self.heading)
        d = np.asarray(d, np.float64)
        return np.stack([x - d * np.sin(th), y + d * np.cos(th)], -1), th

    def curvature(self, s: np.ndarray) -> np.ndarray:
        return np.interp(s, self.s, self.kappa)

    def band(self, s0: float, s1: float, d0: float, d1: float, step: float = 1.0) -> np.ndarray:
        """Closed polygon (K, 2) of the region s0..s1 x d0..d1, counter-clockwise for d0 < d1."""
        n = max(2, int(np.ceil((s1 - s0) / step)) + 1)
        ss = np.linspace(s0, s1, n)
        right, _ = self.frame(ss, min(d0, d1))
        left, _ = self.frame(ss[::-1], max(d0, d1))
        return np.concatenate([right, left], 0)

    def polyline(self, s0: float, s1: float, d: float, step: float = 2.0) -> np.ndarray:
        n = max(2, int(np.ceil((s1 - s0) / step)) + 1)
        return self.frame(np.linspace(s0, s1, n), d)[0]


def make_road(rng: np.random.Generator, origin: tuple[float, float], s_min: float, s_max: float) -> Road:
    """A smooth curve through `origin` at s = 0 with curvature radius >= ~70 m."""
    s = np.arange(s_min, s_max + ROAD_STEP, ROAD_STEP)
    a1, a2 = rng.uniform(1 / 140, 1 / 90), rng.uniform(0, 1 / 400)
    l1, l2 = rng.uniform(140, 260), rng.uniform(50, 90)
    p1, p2 = rng.uniform(0, 2 * np.pi, 2)
    kappa = a1 * np.sin(2 * np.pi * s / l1 + p1) + a2 * np.sin(2 * np.pi * s / l2 + p2)
    # heading = integral of curvature; position = integral of the unit tangent (trapezoid rule)
    heading = np.concatenate([[0.0], np.cumsum((kappa[1:] + kappa[:-1]) / 2 * ROAD_STEP)])
    i0 = int(np.argmin(np.abs(s)))
    heading += rng.uniform(-np.pi, np.pi) - heading[i0]
    c, sn = np.cos(heading), np.sin(heading)
    x = np.concatenate([[0.0], np.cumsum((c[1:] + c[:-1]) / 2 * ROAD_STEP)])
    y = np.concatenate([[0.0], np.cumsum((sn[1:] + sn[:-1]) / 2 * ROAD_STEP)])
    xy = np.stack([x - x[i0] + origin[0], y - y[i0] + origin[1]], -1)
    return Road(s=s, xy=xy, heading=heading, kappa=kappa)


# ---- ego ---------------------------------------------------------------------------------------

@dataclass
class EgoMotion:
    road: Road
    v0: float      # mean speed [m/s]
    dv: float      # speed oscillation amplitude
    period: float  # of the oscillation [s]
    phase: float

    def arc(self, t: np.ndarray) -> np.ndarray:
        """Closed-form arc length travelled at scene time t [s]: integral of v0 + dv sin(wt + p)."""
        w = 2 * np.pi / self.period
        t = np.asarray(t, np.float64)
        return self.v0 * t + self.dv / w * (np.cos(self.phase) - np.cos(w * t + self.phase))

    def pose(self, t: np.ndarray) -> np.ndarray:
        """(...,) times -> (..., 4, 4) ego -> global transforms."""
        xy, th = self.road.frame(self.arc(t), EGO_OFFSET)
        trans = np.concatenate([xy, np.zeros(xy.shape[:-1] + (1,))], -1)
        return make_transform(yaw_to_quat(th), trans)


def make_ego(rng: np.random.Generator, road: Road) -> EgoMotion:
    return EgoMotion(road=road, v0=float(rng.uniform(6.0, 9.0)), dv=float(rng.uniform(0.5, 1.5)),
                     period=float(rng.uniform(8.0, 14.0)), phase=float(rng.uniform(0, 2 * np.pi)))


# ---- objects -----------------------------------------------------------------------------------

# category -> (w, l, h) mean size, speed range [m/s], placement kind
CATEGORY_SPECS: dict[str, tuple[tuple[float, float, float], tuple[float, float], str]] = {
    "vehicle.car":                 ((1.95, 4.62, 1.73), (4.0, 10.0), "lane"),
    "vehicle.truck":               ((2.51, 6.93, 2.84), (3.0, 8.0), "lane"),
    "vehicle.construction":        ((2.85, 6.37, 3.19), (0.0, 0.0), "parked"),
    "vehicle.bus.rigid":           ((2.94, 11.19, 3.47), (3.0, 7.0), "lane"),
    "vehicle.trailer":             ((2.90, 12.29, 3.87), (0.0, 0.0), "parked"),
    "movable_object.barrier":      ((2.53, 0.50, 0.98), (0.0, 0.0), "edge"),
    "vehicle.motorcycle":          ((0.77, 2.11, 1.47), (5.0, 10.0), "lane"),
    "vehicle.bicycle":             ((0.60, 1.70, 1.28), (2.5, 5.0), "kerb"),
    "human.pedestrian.adult":      ((0.67, 0.73, 1.77), (0.9, 1.6), "walkway"),
    "movable_object.trafficcone":  ((0.41, 0.41, 1.07), (0.0, 0.0), "edge"),
    # categories the detection benchmark drops (schema.NUSCENES_CATEGORY_TO_CLASS has no entry)
    "animal":                      ((0.36, 0.73, 0.51), (0.5, 1.5), "walkway"),
    "vehicle.emergency.police":    ((2.04, 5.00, 1.96), (0.0, 0.0), "parked"),
}
MAX_MOVER_SECONDS = 10.0
MAX_PLACEMENT_TRIES = 12  # re-draws of an object's placement that overlaps another or the ego
# extra objects per category on top of the two every category gets
EXTRA_COUNTS = {"vehicle.car": 3, "human.pedestrian.adult": 3, "movable_object.trafficcone": 2,
                "movable_object.barrier": 2}


@dataclass
class ObjectTrack:
    """Constant speed, constant yaw rate motion, present for t_in <= t <= t_out (scene seconds)."""
    key: str           # stable name, hashed into the instance token
    category: str
    size: tuple[float, float, float]  # w, l, h
    x0: float
    y0: float
    yaw0: float
    v: float
    omega: float
    t_ref: float
    t_in: float
    t_out: float

    def boxes(self, t: np.ndarray) -> np.ndarray:
        """(...,) times -> (..., 7) global boxes (x, y, z, w, l, h, yaw)."""
        dt = np.asarray(t, np.float64) - self.t_ref
        yaw = self.yaw0 + self.omega * dt
        if abs(self.omega) > 1e-9:
            x = self.x0 + self.v / self.omega * (np.sin(yaw) - np.sin(self.yaw0))
            y = self.y0 - self.v / self.omega * (np.cos(yaw) - np.cos(self.yaw0))
        else:
            x = self.x0 + self.v * dt * np.cos(self.yaw0)
            y = self.y0 + self.v * dt * np.sin(self.yaw0)
        w, l, h = self.size
        ones = np.ones_like(dt)
        yaw = (yaw + np.pi) % (2 * np.pi) - np.pi
        return np.stack([x, y, h / 2 * ones, w * ones, l * ones, h * ones, yaw], -1)

    def present(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, np.float64)
        return (t >= self.t_in) & (t <= self.t_out)


def _place(rng: np.random.Generator, kind: str) -> tuple[float, int]:
    """Left offset d and travel direction (+1 with the road's s, -1 against) for a placement kind."""
    side = 1 if rng.random() < 0.5 else -1
    if kind == "lane":
        d = float(rng.choice([-5.25, 1.75, 5.25]))
        return d, (1 if d < 0 else -1)
    if kind == "kerb":
        return side * 6.2, -side
    if kind == "edge":
        return side * float(rng.uniform(6.3, 6.8)), 1
    if kind == "parked":
        return side * float(rng.uniform(11.5, 13.0)), 1 if rng.random() < 0.5 else -1
    return side * float(rng.uniform(8.2, 9.8)), 1 if rng.random() < 0.5 else -1  # walkway


def _spine(boxes: np.ndarray) -> tuple[np.ndarray, float]:
    """(T, 7) boxes -> (T, 5, 2) points along each footprint's long axis and the half short side:
    the footprint is (nearly) the set of points within that distance of the axis (a capsule)."""
    w, l = boxes[0, 3], boxes[0, 4]
    yaw = boxes[:, 6] + (0.0 if l >= w else np.pi / 2)
    half = (max(w, l) - min(w, l)) / 2
    u = np.linspace(-1.0, 1.0, 5)[None, :, None] * half
    axis = np.stack([np.cos(yaw), np.sin(yaw)], -1)[:, None]
    return boxes[:, None, :2] + u * axis, min(w, l) / 2


def _clear(track: ObjectTrack, others: list[ObjectTrack], ego: EgoMotion, duration: float) -> bool:
    """No footprint overlap (+0.3 m) with the ego or earlier objects, checked every 0.25 s."""
    t = np.arange(max(track.t_in, 0.0), min(track.t_out, duration) + 1e-9, 0.25)
    if len(t) == 0:
        return True
    pts, r = _spine(track.boxes(t))                                   # (T, 5, 2)
    ego_box = np.concatenate([ego.pose(t)[:, :2, 3], np.zeros((len(t), 1)),
                              np.tile([2.0, 4.8, 1.6], (len(t), 1)),
                              np.arctan2(ego.pose(t)[:, 1, 0], ego.pose(t)[:, 0, 0])[:, None]], 1)
    for other_pts, other_r, mask in [(*_spine(ego_box), np.ones(len(t), bool))] + [
            (*_spine(o.boxes(t)), o.present(t)) for o in others]:
        if not mask.any():
            continue
        gap = np.linalg.norm(pts[mask][:, :, None] - other_pts[mask][:, None], axis=-1).min()
        if gap < r + other_r + 0.3:
            return False
    return True


def make_objects(rng: np.random.Generator, road: Road, ego: EgoMotion, duration: float) -> list[ObjectTrack]:
    """Every category gets one object present the whole scene and one that appears and disappears
    inside it (>= 1.5 s so it spans two keyframes); some get extras with random intervals."""
    tracks: list[ObjectTrack] = []
    for category, (size, speeds, kind) in CATEGORY_SPECS.items():
        n = 2 + EXTRA_COUNTS.get(category, 0)
        for k in range(n):
            if k == 0:
                t_in, t_out = -1.0, duration + 1.0
            elif k == 1:
                t_in = rng.uniform(0.12, 0.3) * duration
                t_out = rng.uniform(0.62, 0.85) * duration
            else:
                t_in = rng.uniform(-0.3, 0.5) * duration
                shortest = max(1.5, 0.3 * duration)
                t_out = t_in + shortest + rng.uniform(0.0, max(duration - shortest, 0.5))
            t_ref = float(rng.uniform(max(t_in, 0.0), min(t_out, duration)))
            if speeds[1] > 2.0:
                # a constant yaw rate only follows a road of varying curvature for a while: movers
                # are seen for at most MAX_MOVER_SECONDS around the moment they pass the ego
                t_in = max(t_in, t_ref - MAX_MOVER_SECONDS / 2)
                t_out = min(t_out, t_ref + MAX_MOVER_SECONDS / 2)
            scale = rng.uniform(0.92, 1.08)
            for _attempt in range(MAX_PLACEMENT_TRIES):
                d, direction = _place(rng, kind)
                s_obj = float(ego.arc(t_ref)) + rng.uniform(-15.0, 45.0)
                xy, th = road.frame(s_obj, d)
                v = float(rng.uniform(*speeds))
                yaw = float(th) if direction > 0 else float(th) + np.pi
                # follow the road's local curvature, plus a small deliberate turn
                omega = direction * v * float(road.curvature(s_obj)) + (rng.uniform(-0.015, 0.015) if v > 0 else 0.0)
                if kind == "edge" and category == "movable_object.barrier":
                    yaw = float(th) + np.pi / 2  # its long side (w) follows the kerb
                track = ObjectTrack(
                    key=f"{category}/{k}", category=category, size=tuple(float(x * scale) for x in size),
                    x0=float(xy[0]), y0=float(xy[1]), yaw0=yaw, v=v, omega=float(omega), t_ref=t_ref,
                    t_in=float(t_in), t_out=float(t_out))
                if _clear(track, tracks, ego, duration):
                    break
            tracks.append(track)
    return tracks


# ---- map elements ------------------------------------------------------------------------------

@dataclass
class Band:
    layer: str
    s0: float
    s1: float
    d0: float
    d1: float
    holes: tuple[tuple[float, float, float, float], ...] = ()   # (s0, s1, d0, d1) regions cut out


@dataclass
class Line:
    layer: str
    s0: float
    s1: float
    d: float


def make_map_elements(rng: np.random.Generator, road: Road, s_lo: float, s_hi: float,
                      holes: bool = True) -> list[Band | Line]:
    """The 8 map layers of schema.MAP_CLASSES as bands/lines along the road between s_lo and s_hi;
    ``holes``: the car park has a planted island (a hole in its drivable and car-park polygons)."""
    hw = ROAD_HALF_WIDTH
    els: list[Band | Line] = [Band("drivable_area", s_lo, s_hi, -hw, hw),
                              Line("road_divider", s_lo, s_hi, 0.0),
                              Line("lane_divider", s_lo, s_hi, -3.5), Line("lane_divider", s_lo, s_hi, 3.5),
                              Band("walkway", s_lo, s_hi, hw + 0.4, hw + 3.6),
                              Band("walkway", s_lo, s_hi, -hw - 3.6, -hw - 0.4)]
    span = s_hi - s_lo
    for frac in (0.3, 0.62):
        sc = s_lo + frac * span + rng.uniform(-10, 10)
        els.append(Band("ped_crossing", sc - 2.0, sc + 2.0, -hw, hw))
        els.append(Band("stop_line", sc - 3.9, sc - 3.4, -hw, 0.0))
        els.append(Band("stop_line", sc + 3.4, sc + 3.9, 0.0, hw))
    side = 1 if rng.random() < 0.5 else -1
    sc = s_lo + rng.uniform(0.2, 0.6) * span
    island = ((sc + 12.0, sc + 20.0, side * (hw + 9.0), side * (hw + 13.0)),) if holes else ()
    els.append(Band("carpark_area", sc, sc + 35.0, side * (hw + 4.0), side * (hw + 20.0), island))
    block = 40.0
    s = s_lo
    while s < s_hi - 1e-6:
        els.append(Band("road_block", s, min(s + block, s_hi), -hw, hw))
        s += block
    return els
