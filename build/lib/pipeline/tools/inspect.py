"""Preview one sample of a shard: its metadata, member shapes, and a picture of what it says.

    python -m pipeline.tools.inspect OUT/train/64x128_t9/shard-000000.tar --dataroot DATA --png preview.png
    python -m pipeline.tools.inspect s3://bucket/out/train/…/shard-000003.tar --vae models/cogvideox-vae --png p.png

The picture has one row per frame (first, middle, last, and the first frame holding a repaired dropped
image, whose view is framed in red and labelled FILLED): the six views (VIEWS order, three per
line) with every present box's 3D outline projected and coloured by class, and the BEV map of
that frame with the boxes drawn from above ("ahead" up, "right" right, ego at the centre, as
documented in pipeline/contract/schema.py). The views show, in order of preference: the source frames
(--dataroot; resized to W and top-cropped to H exactly as the encoder saw them, DESIGN.md §4,
which is the resolution the stored intrinsics are for), the latents decoded by --vae (a local
diffusers AutoencoderKLCogVideoX folder), or, with neither, three latent channels as false
colour (enough to check alignment of boxes with the frame layout).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile

import cv2
import numpy as np

from pipeline.contract import cli, geometry, schema, storage
from pipeline.contract.tarscan import read_shard

# Class colours (RGB) match the synthetic renderer's palette, so a preview of synthetic data shows each
# outline in the colour of the object it should enclose.
CLASS_RGB: tuple[tuple[int, int, int], ...] = (
    (0, 120, 255), (255, 128, 0), (140, 70, 0), (255, 0, 255), (0, 200, 200),
    (255, 0, 0), (130, 0, 255), (0, 230, 0), (255, 90, 170), (255, 255, 0),
)
# BEV layers: (channel in schema.MAP_CLASSES, RGB), painted in this order so lines end up on top of areas.
MAP_PAINT: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("road_block", (60, 60, 66)), ("drivable_area", (85, 85, 95)), ("carpark_area", (110, 100, 90)),
    ("walkway", (150, 140, 120)), ("ped_crossing", (220, 220, 220)), ("stop_line", (250, 250, 250)),
    ("road_divider", (225, 185, 50)), ("lane_divider", (200, 200, 200)),
)
NEAR_M = 0.1        # clip outline edges at this depth so nothing behind a camera is drawn
FILLED_RGB = (255, 40, 40)   # frame and label of a repaired (filled) view-frame
BEV_PANEL = 400     # BEV panel side in pixels (2 px per cell of the 200 grid, 1 of the 400 grid)


def load_sample(uri: str, key: str | None = None) -> schema.Sample:
    """The sample `key` (default: the first intact one) of a shard at a local path or object-store URI, read by
    the loader's own reader (pipeline/contract/tarscan.py): a damaged shard still shows its intact samples."""
    if not storage.exists(uri):
        raise cli.InputNotFound(f"shard {uri} not found; pass a shard .tar (local path or s3://…)")
    samples, report = read_shard(storage.read_bytes(uri), uri)
    for d in report.damage:
        print(f"warning: {d}", file=sys.stderr)
    keys = [s["__key__"] for s in samples]
    for s in samples:
        if key is None or s["__key__"] == key:
            return schema.decode_sample(s, key=s["__key__"])
    if key in report.damaged_keys:
        raise cli.BadInput(f"{uri}: sample {key!r} is damaged in the shard ({report.damage[0].reason}); "
                           f"rebuild the shard (rerun the build) or pick another --key")
    if not keys:
        raise cli.BadInput(f"{uri}: the shard holds no " + ("intact " if report.damage else "") + "samples")
    raise cli.UnknownName(f"{uri}: no sample {key!r}; the shard holds {len(keys)}: "
                          f"{keys[:5]}{' …' if len(keys) > 5 else ''}")


def describe(sample: schema.Sample) -> str:
    """Metadata and a member table (name, dtype, shape) as text."""
    lines = [f"key: {sample.key}", json.dumps(sample.meta, indent=1, sort_keys=True, default=str)[:4000], "",
             f"{'member':<20} {'dtype':<8} shape"]
    for name in schema.ARRAY_FIELDS:
        arr = getattr(sample, name)
        if arr is not None:
            lines.append(f"{name + '.npy':<20} {str(arr.dtype):<8} {tuple(arr.shape)}")
    lines.append(f"{'caption.txt':<20} {'utf-8':<8} {len(sample.caption)} chars: {sample.caption[:100]!r}")
    filled = [f"t={t} {sample.views[v]}" for t, v in sample.meta["filled"]]
    lines.append(f"filled view-frames (repaired drops, fill_mask.npy): {len(filled)}"
                 + (f": {', '.join(filled[:12])}{' ...' if len(filled) > 12 else ''}" if filled else ""))
    n_present = sample.box_mask.sum(1)
    lo, hi = (int(n_present.min()), int(n_present.max())) if n_present.size else (0, 0)
    lines.append(f"objects per frame: min {lo} max {hi}; "
                 f"classes: {dict(sorted(_class_counts(sample).items()))}")
    return "\n".join(lines)


def _class_counts(sample: schema.Sample) -> dict[str, int]:
    ids, counts = np.unique(sample.box_class, return_counts=True)
    return {schema.OBJECT_CLASSES[i]: int(c) for i, c in zip(ids, counts)}


def preview_frames(num_frames: int, fill_mask: np.ndarray | None = None) -> list[int]:
    """First, middle and last frame indices (deduplicated for short clips), plus the first frame holding a
    repaired (filled) view-frame, so that the preview shows one."""
    frames = {0, (num_frames - 1) // 2, num_frames - 1}
    if fill_mask is not None and fill_mask.any():
        frames.add(int(np.flatnonzero(fill_mask.any(1))[0]))
    return sorted(frames)


# ---- geometry of the overlay -------------------------------------------------------------------

def box_outlines(sample: schema.Sample, t: int, v: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Per present box of frame t, its projection into view v: (box index, (8, 2) pixels, (8,) depth).

    Pixels are at the stored resolution (the intrinsics' resolution)."""
    present = np.flatnonzero(sample.box_mask[t])
    if present.size == 0:
        return []
    corners = geometry.box_corners(sample.view_boxes[t, v, present])    # (n, 8, 3) LiDAR(t), view v's time
    lidar2cam = geometry.invert_transform(sample.cam2lidar[t, v])        # (4, 4)
    cam = geometry.transform_points(lidar2cam, corners)                  # (n, 8, 3) camera
    uv, depth = geometry.project(cam, sample.intrinsics[v])              # (n, 8, 2), (n, 8)
    return [(int(n), uv[i], depth[i]) for i, n in enumerate(present)]


def _clipped_edges(sample: schema.Sample, t: int, v: int, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Box edges as pixel segments, each clipped to depth >= NEAR_M (in camera space, before projecting)."""
    corners = geometry.box_corners(sample.view_boxes[t, v, n])           # (8, 3)
    cam = geometry.transform_points(geometry.invert_transform(sample.cam2lidar[t, v]), corners)
    k = np.asarray(sample.intrinsics[v], np.float64)
    out = []
    for a, b in geometry.BOX_EDGES:
        p, q = cam[a], cam[b]
        if p[2] < NEAR_M and q[2] < NEAR_M:
            continue
        if p[2] < NEAR_M or q[2] < NEAR_M:
            s = (NEAR_M - p[2]) / (q[2] - p[2])
            m = p + s * (q - p)
            p, q = (m, q) if p[2] < NEAR_M else (p, m)
        uv, _ = geometry.project(np.stack([p, q]), k)
        out.append((uv[0], uv[1]))
    return out


def draw_boxes_on_view(img: np.ndarray, sample: schema.Sample, t: int, v: int, thickness: int = 1) -> np.ndarray:
    """img (H, W, 3) uint8 RGB at the stored resolution, boxes drawn in place and returned."""
    for n in np.flatnonzero(sample.box_mask[t]):
        rgb = CLASS_RGB[int(sample.box_class[n]) % len(CLASS_RGB)]
        for p, q in _clipped_edges(sample, t, v, int(n)):
            if np.all(np.abs(np.concatenate([p, q])) < 1e5):  # far-off segments overflow cv2's int coordinates
                cv2.line(img, (int(round(p[0])), int(round(p[1]))), (int(round(q[0])), int(round(q[1]))), rgb,
                         thickness, cv2.LINE_AA)
    return img


def lidar_to_bev_pixel(xy: np.ndarray, scale: float = 1.0, cell_m: float = schema.BEV_RESOLUTION_M) -> np.ndarray:
    """(..., 2) LiDAR x, y [m] -> (..., 2) BEV image (col, row) in cell units of ``cell_m`` times `scale`
    (schema orientation)."""
    col = (np.asarray(xy)[..., 0] + schema.BEV_EXTENT_M / 2) / cell_m
    row = (schema.BEV_EXTENT_M / 2 - np.asarray(xy)[..., 1]) / cell_m
    return np.stack([col, row], -1) * scale


def map_layers(packed: np.ndarray, cells: int) -> np.ndarray:
    """One frame's packed BEV (8, G, G/8) -> (G, G, 3) uint8 RGB of its map layers (MAP_PAINT), ahead up."""
    masks = schema.unpack_bev(packed, cells)                             # (8, G, G) bool
    img = np.full((cells, cells, 3), 30, np.uint8)
    for name, rgb in MAP_PAINT:
        img[masks[schema.MAP_CLASSES.index(name)]] = rgb
    return img


def draw_bev(sample: schema.Sample, t: int, size: int = BEV_PANEL) -> np.ndarray:
    """(size, size, 3) uint8 RGB: map layers of frame t with the boxes' footprints and headings."""
    cells, cell_m = int(sample.meta["bev"]["cells"]), float(sample.meta["bev"]["cell_m"])
    img = cv2.resize(map_layers(sample.bev[t], cells), (size, size), interpolation=cv2.INTER_NEAREST)
    scale = size / cells
    for n in np.flatnonzero(sample.box_mask[t]):
        rgb = CLASS_RGB[int(sample.box_class[n]) % len(CLASS_RGB)]
        foot = lidar_to_bev_pixel(geometry.box_corners(sample.boxes[t, n])[:4, :2], scale, cell_m)  # bottom (4, 2)
        cv2.polylines(img, [np.round(foot).astype(np.int32)], True, rgb, 1, cv2.LINE_AA)
        front = foot[:2].mean(0)  # corners 0 and 1 are the +x (heading) side
        centre = foot.mean(0)
        cv2.line(img, tuple(np.round(centre).astype(int)), tuple(np.round(front).astype(int)), rgb, 1, cv2.LINE_AA)
    ego = lidar_to_bev_pixel(np.array([[-0.9, -2.0], [0.9, 2.0]]), scale, cell_m).round().astype(int)
    cv2.rectangle(img, tuple(ego[0]), tuple(ego[1]), (255, 255, 255), -1)
    return img


# ---- pixels of the views ------------------------------------------------------------------------

def source_frame(dataroot: str, rel: str, width: int, height: int) -> np.ndarray:
    """A source frame as the encoder saw it: (H, W, 3) uint8 RGB (resize to W, crop the top to H)."""
    from pipeline.shards.frames import decode_resize_crop
    uri = storage.join(dataroot, rel)
    if not storage.is_remote(uri):
        return decode_resize_crop(uri, width, height, draft=False)
    with tempfile.NamedTemporaryFile(suffix=os.path.splitext(rel)[1]) as f:
        f.write(storage.read_bytes(uri))
        f.flush()
        return decode_resize_crop(f.name, width, height, draft=False)


def decode_latents(sample: schema.Sample, vae_dir: str) -> np.ndarray:
    """(V, T, H, W, 3) uint8 RGB decoded from latent_mean by the CogVAE in `vae_dir` (unscaled latents)."""
    import torch
    from diffusers import AutoencoderKLCogVideoX
    vae = AutoencoderKLCogVideoX.from_pretrained(vae_dir, local_files_only=True, low_cpu_mem_usage=False).eval()
    z = torch.from_numpy(sample.latent_mean.astype(np.float32))          # (V, 16, T', h, w)
    with torch.no_grad():
        x = vae.decode(z).sample                                         # (V, 3, T, H, W) in [-1, 1]
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).numpy()                              # (V, T, H, W, 3)


def latent_false_colour(sample: schema.Sample, t: int, v: int) -> np.ndarray:
    """(H, W, 3) uint8: latent channels 0-2 of the latent frame holding frame t, normalised and upsampled."""
    lat = sample.latent_mean[v, :3, (t + schema.VAE_TEMPORAL_COMPRESSION - 1) // schema.VAE_TEMPORAL_COMPRESSION]
    lat = lat.astype(np.float32)                                         # (3, H/8, W/8)
    lo, hi = lat.min(axis=(1, 2), keepdims=True), lat.max(axis=(1, 2), keepdims=True)
    img = ((lat - lo) / np.maximum(hi - lo, 1e-6) * 255).astype(np.uint8).transpose(1, 2, 0)
    h, w = int(sample.meta["height"]), int(sample.meta["width"])
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_NEAREST)


def view_images(sample: schema.Sample, frames: list[int], dataroot: str | None, vae: str | None
                ) -> tuple[dict[tuple[int, int], np.ndarray], str]:
    """{(t, v): (H, W, 3) uint8 RGB} for the requested frames, and which source was used."""
    h, w, views = int(sample.meta["height"]), int(sample.meta["width"]), len(sample.views)
    if dataroot:
        return {(t, v): source_frame(dataroot, sample.meta["frames"][t][v], w, h)
                for t in frames for v in range(views)}, "source frames"
    if vae:
        dec = decode_latents(sample, vae)
        return {(t, v): np.ascontiguousarray(dec[v, t]) for t in frames for v in range(views)}, "VAE-decoded latents"
    return {(t, v): latent_false_colour(sample, t, v) for t in frames for v in range(views)}, \
        "latent channels 0-2 (false colour)"


def render_preview(sample: schema.Sample, dataroot: str | None = None, vae: str | None = None,
                   scale: int | None = None) -> np.ndarray:
    """The whole picture as (rows, cols, 3) uint8 RGB: a header (wrapped, never cut), a legend of the box
    classes and map layers, then per frame the views (labelled above each tile) and the BEV map."""
    from pipeline.tools import panels
    frames = preview_frames(sample.num_frames, sample.fill_mask)
    images, source = view_images(sample, frames, dataroot, vae)
    h, w = int(sample.meta["height"]), int(sample.meta["width"])
    scale = scale or panels.readable_scale(w)  # small buckets are enlarged so boxes and labels stay readable
    big = _scaled(sample, scale)
    per_row = 3
    rows = []
    for t in frames:
        tiles = []
        for v, name in enumerate(sample.views):
            img = panels.enlarge(images[(t, v)], scale)
            draw_boxes_on_view(img, big, t, v, thickness=max(1, scale // 2))
            fill = " (repaired drop)" if sample.fill_mask[t, v] else ""
            if sample.fill_mask[t, v]:   # a repaired drop: the image of the same camera's nearest round
                cv2.rectangle(img, (0, 0), (img.shape[1] - 1, img.shape[0] - 1), FILLED_RGB, 2)
            tiles.append(panels.labelled(img, f"{name}{fill}"))
        blank = np.zeros_like(tiles[0])
        lines = [np.concatenate(tiles[i:i + per_row] + [blank] * (per_row - len(tiles[i:i + per_row])), 1)
                 for i in range(0, len(tiles), per_row)]
        grid = np.concatenate(lines, 0)
        bev = panels.labelled(draw_bev(sample, t, size=grid.shape[0] - panels.LINE_PX - panels.PAD_PX - 2),
                              "BEV, ahead up")
        bev = np.pad(bev, ((0, grid.shape[0] - bev.shape[0]), (0, 0), (0, 0)))
        label = panels.text_band(f"t={t}", 70)
        label = np.pad(label, ((0, grid.shape[0] - label.shape[0]), (0, 0), (0, 0)))
        rows.append(np.concatenate([label, grid, bev], 1))
    width = rows[0].shape[1]
    counts = _class_counts(sample)
    header = panels.text_band([f"{sample.key}  |  views: {source}  |  {sample.num_frames} frames, frame t = "
                               f"{schema.REFERENCE_VIEW}'s exposure", f"caption: {sample.caption}"], width)
    legend = np.concatenate([
        panels.legend_band([(f"{c} ({counts[c]})", CLASS_RGB[i]) for i, c in enumerate(schema.OBJECT_CLASSES)
                            if c in counts] or [("no objects", (30, 30, 30))], width, "boxes:"),
        panels.legend_band([(n, rgb) for n, rgb in MAP_PAINT] + [("ego", (255, 255, 255))], width, "map:")], 0)
    return np.concatenate([header, legend] + rows, 0)


def _scaled(sample: schema.Sample, scale: int) -> schema.Sample:
    """The sample with intrinsics for an image enlarged `scale` times (pixel centres kept)."""
    if scale == 1:
        return sample
    import dataclasses
    from pipeline.tools.panels import scale_intrinsics
    return dataclasses.replace(sample, intrinsics=scale_intrinsics(sample.intrinsics, scale).astype(np.float32))


def save_png(img: np.ndarray, path: str) -> None:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    storage.atomic_write(path, buf.getvalue())


@cli.entry(user_errors=(schema.SchemaError,))  # a shard that breaks the contract is bad input here
def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(
        prog="mdv2-inspect", description=__doc__.split("\n\n", 1)[0] + " Prints meta.json and the member table; "
        "with --png also draws the views with projected boxes next to the BEV map for the first, middle and last "
        "frame.", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("shard", help="a shard .tar: local path or object-store URI (s3://, gs://)")
    p.add_argument("--key", help="sample key inside the shard (default: the first sample)")
    p.add_argument("--dataroot", help="nuScenes root the shard was built from: draw the source frames")
    p.add_argument("--vae", help="local CogVAE folder: draw the latents decoded (used when --dataroot is not given)")
    p.add_argument("--png", help="write the preview picture here (local path or URI)")
    p.add_argument("--scale", type=int, help="enlarge views this many times (default: to about 320 px wide)")
    p.add_argument("--rerun", metavar="OUT.rrd", help="write a Rerun recording of the sample (or --scene) here: "
                   "cameras, 3-D boxes, BEV map and ego path on a 12 Hz timeline (pipeline/tools/rerunlog.py; "
                   "needs the viewer extra, rerun-sdk); open it with `rerun OUT.rrd`")
    p.add_argument("--scene", help="with --rerun: every sample of this scene in the shard's bucket folder, chained "
                   "on one timeline (instead of one sample)")
    a = p.parse_args(argv)
    if a.scene and not a.rerun:
        raise cli.BadInput("--scene needs --rerun OUT.rrd (the PNG preview shows one sample)")
    if a.dataroot and not storage.exists(a.dataroot):
        raise cli.InputNotFound(f"--dataroot {a.dataroot} not found; pass the nuScenes root the shard was built from")
    if a.vae:
        from pipeline.shards.encode import vae_meta
        vae_meta(a.vae)  # a folder without config.json fails here, before any drawing
    if a.rerun:
        from pipeline.tools.rerunlog import inspect_recording
        keys, notes = inspect_recording(a.rerun, a.shard, a.key, a.scene, a.dataroot, a.vae)
        print("\n".join([f"rerun recording of {len(keys)} clip(s) written to {a.rerun}: {', '.join(keys)}"] + notes))
        if not a.png:
            return 0
    sample = load_sample(a.shard, a.key)
    print(describe(sample))
    if a.png:
        save_png(render_preview(sample, a.dataroot, a.vae, a.scale), a.png)
        print(f"preview written to {a.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
