"""Writing what the sampler made: mp4s (PyAV) and a PNG contact sheet with projected boxes."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

from pipeline.contract import geometry

CLASS_COLOURS = [(255, 158, 0), (255, 99, 71), (233, 150, 70), (255, 69, 0), (255, 140, 0),
                 (112, 128, 144), (255, 61, 99), (220, 20, 60), (0, 0, 230), (47, 79, 79)]


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """(..., 3, H, W) float in [-1, 1] -> (..., H, W, 3) uint8."""
    x = np.clip((np.asarray(frames, np.float32) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return np.moveaxis(x, -3, -1)


def write_mp4(path: str | Path, frames: np.ndarray, fps: int = 12) -> Path:
    """(T, H, W, 3) uint8 -> H.264 mp4 (yuv420p needs even sizes: odd edges are padded)."""
    frames = np.asarray(frames)
    t, h, w, _ = frames.shape
    ph, pw = h % 2, w % 2
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w + pw, h + ph, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def grid(views: np.ndarray, cols: int = 3) -> np.ndarray:
    """(V, ..., H, W, 3) -> (..., rows*H, cols*W, 3); views fill rows left to right (front row first)."""
    v = views.shape[0]
    rows = -(-v // cols)
    pad = rows * cols - v
    if pad:
        views = np.concatenate([views, np.zeros((pad,) + views.shape[1:], views.dtype)])
    r = views.reshape(rows, cols, *views.shape[1:])               # (rows, cols, ..., H, W, 3)
    r = np.moveaxis(r, (0, 1), (-5, -3))                          # (..., rows, H, cols, W, 3)
    return r.reshape(*r.shape[:-5], rows * r.shape[-4], cols * r.shape[-2], 3)


def draw_boxes(image: np.ndarray, boxes: np.ndarray, classes: np.ndarray, intrinsics: np.ndarray,
               cam2lidar: np.ndarray, min_depth: float = 0.1) -> np.ndarray:
    """Project (N, 7) LiDAR boxes into one view and draw their 12 edges. image (H, W, 3) uint8."""
    img = Image.fromarray(image)
    draw = ImageDraw.Draw(img)
    if len(boxes):
        corners = geometry.box_corners(boxes)                                            # (N, 8, 3)
        cam = geometry.transform_points(geometry.invert_transform(cam2lidar), corners)   # (N, 8, 3)
        uv, depth = geometry.project(cam, intrinsics)
        for n in range(len(boxes)):
            colour = CLASS_COLOURS[int(classes[n]) % len(CLASS_COLOURS)]
            for a, b in geometry.BOX_EDGES:
                if depth[n, a] > min_depth and depth[n, b] > min_depth:
                    draw.line([tuple(uv[n, a]), tuple(uv[n, b])], fill=colour, width=1)
    return np.asarray(img)


FILLED_RGB = (255, 40, 40)   # frame and label of a view whose conditions come from a repaired (held) image


def contact_sheet(path: str | Path, frames: np.ndarray, view_boxes: np.ndarray, box_mask: np.ndarray,
                  classes: np.ndarray, intrinsics: np.ndarray, cam2lidar: np.ndarray, names: list[str],
                  filled: np.ndarray | None = None) -> Path:
    """One frame t of every view (frames (V, H, W, 3)) with that frame's boxes, labelled, in a grid.
    Schema 2.0: view v draws its own boxes view_boxes[t, v] (V, N, 7) through its own extrinsics
    cam2lidar[t, v] (V, 4, 4), both at v's exposure; box_mask[t] (N,) marks the present objects.
    ``filled`` (V,) bool marks the views whose source frame t was a repaired drop (schema 3.0): red frame, label."""
    tiles = []
    for v in range(frames.shape[0]):
        tile = draw_boxes(frames[v], view_boxes[v][box_mask], classes[box_mask], intrinsics[v], cam2lidar[v])
        img = Image.fromarray(tile)
        mark = filled is not None and bool(filled[v])
        ImageDraw.Draw(img).text((2, 1), names[v] + (" FILLED" if mark else ""),
                                 fill=FILLED_RGB if mark else (255, 255, 255))
        if mark:
            ImageDraw.Draw(img).rectangle([0, 0, img.width - 1, img.height - 1], outline=FILLED_RGB, width=2)
        tiles.append(np.asarray(img))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid(np.stack(tiles), cols=min(3, len(tiles)))).save(path)
    return path
