"""Rigid transforms, quaternions, 3D boxes and pinhole projection (numpy, vectorised).

One home for the geometry every stage shares: the synthetic renderer, the
interpolation, the view masks of the shards and the preview all call these.
Quaternions are (w, x, y, z) as in nuScenes; transforms are 4x4 homogeneous.
"""
from __future__ import annotations

import numpy as np

# corner order: x (length) -, y (width) -, z -, ... ; the first four are the bottom face
_CORNER_SIGNS = np.array([[sx, sy, sz] for sz in (-1, 1) for sx, sy in ((1, 1), (1, -1), (-1, -1), (-1, 1))],
                         dtype=np.float64)  # (8, 3)
BOX_EDGES = ((0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7))
BOX_FACES = ((0, 1, 2, 3), (4, 5, 6, 7), (0, 1, 5, 4), (1, 2, 6, 5), (2, 3, 7, 6), (3, 0, 4, 7))


def quat_to_matrix(q: np.ndarray) -> np.ndarray:
    """(..., 4) quaternions (w, x, y, z) -> (..., 3, 3) rotation matrices."""
    q = np.asarray(q, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = np.moveaxis(q, -1, 0)
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def matrix_to_quat(r: np.ndarray) -> np.ndarray:
    """(..., 3, 3) rotation matrices -> (..., 4) unit quaternions (w, x, y, z) with w >= 0."""
    r = np.asarray(r, dtype=np.float64)
    m00, m11, m22 = r[..., 0, 0], r[..., 1, 1], r[..., 2, 2]
    q = np.stack([
        np.sqrt(np.maximum(0, 1 + m00 + m11 + m22)) / 2,
        np.sqrt(np.maximum(0, 1 + m00 - m11 - m22)) / 2,
        np.sqrt(np.maximum(0, 1 - m00 + m11 - m22)) / 2,
        np.sqrt(np.maximum(0, 1 - m00 - m11 + m22)) / 2,
    ], -1)
    q[..., 1] = np.copysign(q[..., 1], r[..., 2, 1] - r[..., 1, 2])
    q[..., 2] = np.copysign(q[..., 2], r[..., 0, 2] - r[..., 2, 0])
    q[..., 3] = np.copysign(q[..., 3], r[..., 1, 0] - r[..., 0, 1])
    return q / np.linalg.norm(q, axis=-1, keepdims=True)


def yaw_to_quat(yaw: np.ndarray) -> np.ndarray:
    """Rotation about +z by yaw -> (..., 4) quaternion."""
    yaw = np.asarray(yaw, dtype=np.float64)
    return np.stack([np.cos(yaw / 2), np.zeros_like(yaw), np.zeros_like(yaw), np.sin(yaw / 2)], -1)


def yaw_of_matrix(r: np.ndarray) -> np.ndarray:
    """Heading of the rotated +x axis in the xy plane: atan2(R[1,0], R[0,0])."""
    r = np.asarray(r)
    return np.arctan2(r[..., 1, 0], r[..., 0, 0])


def wrap_angle(a: np.ndarray) -> np.ndarray:
    """Wrap to [-pi, pi)."""
    return (np.asarray(a) + np.pi) % (2 * np.pi) - np.pi


def slerp(q0: np.ndarray, q1: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Spherical interpolation of (..., 4) quaternions; alpha broadcastable to (...)."""
    q0 = np.asarray(q0, np.float64)
    q1 = np.asarray(q1, np.float64)
    alpha = np.asarray(alpha, np.float64)[..., None]
    dot = np.sum(q0 * q1, -1, keepdims=True)
    q1 = np.where(dot < 0, -q1, q1)  # shortest arc
    dot = np.clip(np.abs(dot), -1.0, 1.0)
    theta = np.arccos(dot)
    sin = np.sin(theta)
    small = sin < 1e-8
    w0 = np.where(small, 1 - alpha, np.sin((1 - alpha) * theta) / np.where(small, 1, sin))
    w1 = np.where(small, alpha, np.sin(alpha * theta) / np.where(small, 1, sin))
    q = w0 * q0 + w1 * q1
    return q / np.linalg.norm(q, axis=-1, keepdims=True)


def make_transform(rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """Rotation (..., 3, 3) or quaternion (..., 4) and translation (..., 3) -> (..., 4, 4)."""
    rotation = np.asarray(rotation, np.float64)
    if rotation.shape[-1] == 4:
        rotation = quat_to_matrix(rotation)
    translation = np.asarray(translation, np.float64)
    out = np.zeros(rotation.shape[:-2] + (4, 4))
    out[..., :3, :3] = rotation
    out[..., :3, 3] = translation
    out[..., 3, 3] = 1.0
    return out


def invert_transform(t: np.ndarray) -> np.ndarray:
    """Inverse of rigid (..., 4, 4) transforms."""
    t = np.asarray(t, np.float64)
    r = np.swapaxes(t[..., :3, :3], -1, -2)
    out = np.zeros_like(t)
    out[..., :3, :3] = r
    out[..., :3, 3] = -np.einsum("...ij,...j->...i", r, t[..., :3, 3])
    out[..., 3, 3] = 1.0
    return out


def transform_points(t: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply (..., 4, 4) to (..., P, 3) points (broadcasting the leading dims)."""
    t = np.asarray(t, np.float64)
    return np.einsum("...ij,...pj->...pi", t[..., :3, :3], points) + t[..., None, :3, 3]


def box_corners(boxes: np.ndarray) -> np.ndarray:
    """(..., 7) boxes (x, y, z, w, l, h, yaw) -> (..., 8, 3) corners; length along the heading."""
    boxes = np.asarray(boxes, np.float64)
    half = np.stack([boxes[..., 4], boxes[..., 3], boxes[..., 5]], -1)[..., None, :] / 2  # (l, w, h)/2
    local = _CORNER_SIGNS * half  # (..., 8, 3)
    c, s = np.cos(boxes[..., 6])[..., None], np.sin(boxes[..., 6])[..., None]
    x = c * local[..., 0] - s * local[..., 1]
    y = s * local[..., 0] + c * local[..., 1]
    return np.stack([x, y, local[..., 2]], -1) + boxes[..., None, :3]


def transform_boxes(t: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Express (..., 7) boxes in another frame by the rigid (..., 4, 4) transform t.

    The centre is exact for any rotation; the new yaw is the heading of the box's rotated +x axis in
    the new xy plane, atan2(R[1, 0], R[0, 0]) of the composed rotation, so a transform with roll/pitch
    (tilted sensor mounts) keeps the heading right. (pyquaternion's ``yaw_pitch_roll[0]`` is a
    different Euler convention that differs by ~1e-5 rad under a 1 deg tilt.)"""
    boxes = np.asarray(boxes, np.float64)
    t = np.asarray(t, np.float64)
    r = t[..., :3, :3]
    centre = np.einsum("...ij,...j->...i", r, boxes[..., :3]) + t[..., :3, 3]
    c, s = np.cos(boxes[..., 6]), np.sin(boxes[..., 6])
    yaw = np.arctan2(r[..., 1, 0] * c + r[..., 1, 1] * s, r[..., 0, 0] * c + r[..., 0, 1] * s)
    return np.concatenate([centre, np.broadcast_to(boxes[..., 3:6], centre.shape), yaw[..., None]], -1)


def project(points_cam: np.ndarray, intrinsics: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., P, 3) camera-frame points -> ((..., P, 2) pixels, (..., P) depth)."""
    depth = points_cam[..., 2]
    uvw = np.einsum("...ij,...pj->...pi", np.asarray(intrinsics, np.float64), points_cam)
    uv = uvw[..., :2] / np.where(np.abs(depth) < 1e-9, 1e-9, depth)[..., None]
    return uv, depth


def box_view_visibility(boxes: np.ndarray, intrinsics: np.ndarray, cam2lidar: np.ndarray, width: int,
                        height: int, min_depth: float = 0.1) -> np.ndarray:
    """The static-rig case of view_box_visibility: one box per frame for every view, fixed extrinsics.

    boxes (T, N, 7) in LiDAR; intrinsics (V, 3, 3); cam2lidar (V, 4, 4) -> (T, V, N) bool."""
    t, v = np.shape(boxes)[0], np.shape(cam2lidar)[0]
    view_boxes = np.broadcast_to(np.asarray(boxes)[:, None], (t, v) + np.shape(boxes)[1:])
    return view_box_visibility(view_boxes, intrinsics, np.broadcast_to(cam2lidar, (t, v, 4, 4)), width, height,
                               min_depth)


def view_box_visibility(view_boxes: np.ndarray, intrinsics: np.ndarray, cam2lidar: np.ndarray, width: int,
                        height: int, min_depth: float = 0.1) -> np.ndarray:
    """Which boxes each view sees: any corner in front of the camera and inside the image, each view
    with its own boxes and per-frame extrinsics (schema 2.0).

    view_boxes (T, V, N, 7) in LiDAR(t); intrinsics (V, 3, 3); cam2lidar (T, V, 4, 4) -> (T, V, N) bool."""
    corners = box_corners(view_boxes)                  # (T, V, N, 8, 3)
    lidar2cam = invert_transform(cam2lidar)            # (T, V, 4, 4)
    pts = transform_points(lidar2cam[:, :, None], corners)             # (T, V, N, 8, 3)
    uv, depth = project(pts, np.asarray(intrinsics)[None, :, None])
    inside = (depth > min_depth) & (uv[..., 0] >= 0) & (uv[..., 0] < width) & (uv[..., 1] >= 0) & (uv[..., 1] < height)
    return inside.any(-1)


def resize_crop_intrinsics(k: np.ndarray, src_size: tuple[int, int], width: int, height: int) -> np.ndarray:
    """Intrinsics after resizing a (W0, H0) image to width W (keeping aspect) and cropping the top rows to H.

    DESIGN.md §4: 900x1600 -> 848x1600 drops the top 52 rows; the principal point moves up."""
    w0, h0 = src_size
    scale = width / w0
    resized_h = int(round(h0 * scale))
    if resized_h < height:
        raise ValueError(f"image {w0}x{h0} resized to width {width} is {resized_h} rows, fewer than the "
                         f"bucket height {height}; choose a smaller height or wider bucket")
    k = np.array(k, dtype=np.float64, copy=True)
    k[..., :2, :] *= scale
    k[..., 1, 2] -= resized_h - height
    return k
