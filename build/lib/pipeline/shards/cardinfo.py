"""The facts of a build output for readers, as data: ``info.json`` and the Hugging Face features of the card.

Everything here is derived from pipeline/contract/schema.py (members with their axes, units, frames and
padding; classes; the BEV grid rule; the key and path templates) plus what the build knew (source, VAE,
captions) and what the manifests hold (shards and samples per split and bucket). pipeline/shards/card.py
renders the same dict as README.md, so the two never disagree. Like LeRobot's ``meta/info.json``: a
codebase and schema version, and every feature with its dtype, shape and axis names, here per bucket
(shapes differ by bucket; N, the objects of a clip, is ``null``: it varies per sample).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

from pipeline.contract import schema
from pipeline.contract.manifest import ShardRecord

# meta.json fields: (Hugging Face feature type, meaning). Exactly schema.META_FIELDS (tests/test_card.py).
META_DOC: dict[str, tuple[Any, str]] = {
    "schema_version": ("string", "sample schema MAJOR.MINOR; readers refuse another major"),
    "pipeline_version": ("string", "version of the pipeline that wrote the sample"),
    "dataset": ("string", "source table version, e.g. v1.0-trainval"),
    "split": ("string", "train or val (the source's scene split)"),
    "scene_token": ("string", "source scene token"),
    "scene_name": ("string", "source scene name"),
    "start_frame": ("int64", "index of frame 0 of the clip on the scene's 12 Hz timeline"),
    "num_frames": ("int64", "T, frames of the clip (4k+1)"),
    "fps": ("int64", "frames per second of the timeline (12)"),
    "height": ("int64", "H, stored image height in pixels"),
    "width": ("int64", "W, stored image width in pixels"),
    "views": (["string"], "V camera names, the order of every view axis"),
    "timestamps_us": (["int64"], "T times of frame t in microseconds: the reference camera's exposure"),
    "view_timestamps_us": ([["int64"]], "T x V exposure time of each view-frame in microseconds"),
    "keyframes": (["bool"], "T flags: frame t is an annotated keyframe (2 Hz) of the source"),
    "frames": ([["string"]], "T x V source image paths, relative to the source dataroot"),
    "vae": ({"name": "string", "scaling_factor": "float64", "temporal_compression": "int64",
             "spatial_compression": "int64"}, "the VAE that made the latents"),
    "latent": ("string", "'mean' or 'mean+std': whether latent_std.npy is stored"),
    "caption": ({"source": "string", "prompt_version": "string", "model": "string"},
                "where caption.txt came from: dataset (scene description), mllm (model, prompt version) or none"),
    "filled": ([["int64"]], "sorted [t, v] pairs of view-frames repaired from a dropped image (= fill_mask)"),
    "bev": ({"cells": "int64", "cell_m": "float64"}, "the BEV grid of this bucket: G cells of cell_m metres"),
    "source_size": ([["int64"]], "V [W, H] sizes of the source images (for source_intrinsics)"),
}

LICENSES = {  # by source table version; anything else is "other" (say so in the card)
    "v1.0-mini": "cc-by-nc-sa-4.0", "v1.0-trainval": "cc-by-nc-sa-4.0", "v1.0-test": "cc-by-nc-sa-4.0",
    "v1.0-synth": "apache-2.0",
}
LICENSE_NOTE = {
    "cc-by-nc-sa-4.0": "derived from nuScenes (Motional), whose terms of use apply: CC BY-NC-SA 4.0, "
                       "non-commercial use only",
    "apache-2.0": "synthetic data written by this project's generator (pipeline/synth, Apache-2.0): no "
                  "third-party content",
    "other": "derived from a source whose license this build does not know: check the source's terms",
}
TAGS = ("autonomous-driving", "driving", "multi-view", "video", "webdataset", "latents", "cogvideox",
        "3d-bounding-boxes", "bird's-eye-view", "nuscenes", "magicdrive")


def bucket_dims(height: int, width: int, num_frames: int) -> dict[str, Any]:
    """The sizes a bucket's members follow (schema Member.shape), N = None: it varies per sample."""
    cells, _ = schema.bev_grid(height)
    return {"V": len(schema.VIEWS), "T": num_frames, "Tl": schema.latent_frames(num_frames), "H": height,
            "W": width, "G": cells, "N": None}


def feature(m: schema.Member, dims: dict | None = None) -> dict[str, Any]:
    """One member as a feature: dtype, axis names and sizes (symbolic, or this bucket's), units, frame."""
    f: dict[str, Any] = {"dtype": m.dtype or ("json" if m.name.endswith(".json") else "utf-8 text"),
                         "required": m.required, "doc": m.doc}
    if m.axes:
        f["names"] = [a.split(" ", 1)[1] for a in m.axes]
        f["shape"] = list(m.shape(dims)) if dims else [a.split(" ", 1)[0] for a in m.axes]
    for k in ("units", "frame", "padding"):
        if getattr(m, k):
            f[k] = getattr(m, k)
    return f


def _per_bucket(records: list[ShardRecord]) -> dict[tuple[str, str], dict]:
    out: dict[tuple[str, str], dict] = defaultdict(lambda: {"shards": 0, "samples": 0, "bytes": 0})
    for r in records:
        b = out[(r.split, r.bucket)]
        b["shards"], b["samples"], b["bytes"] = b["shards"] + 1, b["samples"] + r.samples, b["bytes"] + r.bytes
    return dict(sorted(out.items()))


def dataset_info(records: list[ShardRecord], build: dict[str, Any], quarantined: int,
                 captions: list[dict] | None = None, stats: dict | None = None) -> dict[str, Any]:
    """info.json: the whole description of a build output (the card is rendered from it)."""
    shapes = {r.bucket: (r.height, r.width, r.num_frames) for r in records}
    per = _per_bucket(records)
    buckets = {}
    for name, (h, w, t) in sorted(shapes.items()):
        dims = bucket_dims(h, w, t)
        cells, cell_m = schema.bev_grid(h)
        buckets[name] = {
            "height": h, "width": w, "num_frames": t, "latent_frames": dims["Tl"],
            "latent_size": [h // schema.VAE_SPATIAL_COMPRESSION, w // schema.VAE_SPATIAL_COMPRESSION],
            "bev": {"cells": cells, "cell_m": cell_m},
            "splits": {s: v for (s, b), v in per.items() if b == name},
            "data_files": {s: f"{s}/{name}/*.tar" for (s, b) in per if b == name},
            "features": {m.name: feature(m, dims) for m in schema.MEMBERS}}
    total = sum(v["samples"] for v in per.values())
    version = str(build.get("version") or build.get("dataset") or "")
    license_id = build.get("license") or LICENSES.get(version, "other")
    return {
        "codebase_version": schema.PIPELINE_VERSION, "schema_version": schema.SCHEMA_VERSION,
        "title": build.get("title", "MagicDrive-V2 training shards"),
        "license": license_id, "license_note": LICENSE_NOTE.get(license_id, LICENSE_NOTE["other"]),
        "build": {k: build.get(k) for k in ("dataset", "version", "dataroot", "scenes", "stage", "vae", "tiny_vae",
                                            "config_hash", "yield", "status")},
        "captions": captions if captions is not None else [{**_caption_source(build.get("captions")),
                                                             "samples": total}],
        "total_samples": total, "quarantined": quarantined, "fps": schema.FPS,
        "views": list(schema.VIEWS), "reference_view": schema.REFERENCE_VIEW,
        "object_classes": list(schema.OBJECT_CLASSES), "map_classes": list(schema.MAP_CLASSES),
        "map_polygon_classes": list(schema.MAP_POLYGON_CLASSES), "map_line_classes": list(schema.MAP_LINE_CLASSES),
        "category_to_class": dict(sorted(schema.NUSCENES_CATEGORY_TO_CLASS.items())),
        "bev": {"extent_m": schema.BEV_EXTENT_M, "min_height_for_large_grid": schema.BEV_LARGE_MIN_HEIGHT,
                "grids": [{"cells": c, "cell_m": r} for c, r in schema.BEV_GRIDS],
                "row_i_y_m": "extent/2 - cell_m * (i + 0.5)  (row 0 farthest ahead)",
                "col_j_x_m": "-extent/2 + cell_m * (j + 0.5)  (column 0 farthest left)",
                "packing": {"axis": -1, "function": "numpy.packbits", "bitorder": "big"}},
        "camera": {"model": "pinhole", "distortion": None, "camera_axes": "x right, y down, z forward",
                   "projection": "u = fx * x / z + cx, v = fy * y / z + cy (x, y, z in the camera frame)",
                   "resize_rule": "resize to width W keeping aspect (fx, fy, cx, cy scaled by W / W0), then crop "
                                  "the top rows to height H (cy decreases by the rows cropped)"},
        "coordinates": {"lidar": "LiDAR(t): x right, y forward, z up, metres, origin at the LiDAR at frame t",
                        "box": "x y z (centre) w l h (size across, along the heading, up) yaw (rad about +z from "
                               "LiDAR +x, in [-pi, pi))",
                        "time": "frame t = the reference camera's exposure; each view fires at its own time "
                                "(meta view_timestamps_us)"},
        "key_template": schema.KEY_TEMPLATE, "shard_template": schema.SHARD_TEMPLATE,
        "manifest_template": schema.MANIFEST_TEMPLATE,
        "features": {m.name: feature(m) for m in schema.MEMBERS},
        "meta_fields": {k: {"type": t, "doc": d} for k, (t, d) in META_DOC.items()},
        "splits": {s: {b: v for (s2, b), v in per.items() if s2 == s} for s in sorted({s for s, _ in per})},
        "buckets": buckets,
        "stats": stats,
    }


def _caption_source(captions: str | None) -> dict:
    """The build's caption setting ('dataset', 'none' or 'mllm:MODEL:PROMPT') as meta.json's caption block."""
    parts = str(captions or "none").split(":")
    if parts[0] == "mllm" and len(parts) >= 3:
        return {"source": "mllm", "model": ":".join(parts[1:-1]), "prompt_version": parts[-1]}
    return {"source": parts[0], "model": None, "prompt_version": None}


# ---- Hugging Face: the card's YAML front matter --------------------------------------------------

def _hf_type(t: Any) -> dict[str, Any]:
    """A META_DOC type as a Hugging Face features YAML entry (without the name)."""
    if isinstance(t, str):
        return {"dtype": t}
    if isinstance(t, list):
        inner = _hf_type(t[0])
        return {"list": inner["dtype"] if list(inner) == ["dtype"] else inner}
    return {"struct": [{"name": k, **_hf_type(v)} for k, v in t.items()]}


def _hf_array(m: schema.Member, shape: tuple) -> dict[str, Any]:
    """Fixed shapes as ArrayND (dtype kept, float16 stays float16); a variable axis (N) anywhere but first
    becomes nested lists, fixed lengths kept."""
    if None not in shape and 2 <= len(shape) <= 5:
        return {"dtype": {f"array{len(shape)}_d": {"shape": list(shape), "dtype": m.dtype}}}
    node: Any = m.dtype
    for n in reversed(shape):
        node = {"list": node} if n is None else {"list": node, "length": n}
    return node if isinstance(node, dict) else {"dtype": node}


def hf_features(height: int, width: int, num_frames: int) -> list[dict[str, Any]]:
    """The features of one bucket's config, in the YAML form of ``datasets.Features._to_yaml_list``."""
    dims = bucket_dims(height, width, num_frames)
    out = [{"name": "__key__", "dtype": "string"}, {"name": "__url__", "dtype": "string"}]
    for m in schema.MEMBERS:
        if m.name == "meta.json":
            out.append({"name": m.name, "struct": [{"name": k, **_hf_type(t)} for k, (t, _) in META_DOC.items()]})
        elif m.dtype is None:
            out.append({"name": m.name, "dtype": "string"})
        else:
            out.append({"name": m.name, **_hf_array(m, m.shape(dims))})
    return out


def size_category(samples: int) -> str:
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if samples < bound:
            return name
    return "1M<n<10M"


def front_matter(info: dict[str, Any]) -> dict[str, Any]:
    """The card's YAML: license, tags, one config per bucket with its data files and features."""
    configs, infos = [], []
    for name, b in info["buckets"].items():
        configs.append({"config_name": name,
                        "data_files": [{"split": s, "path": p} for s, p in sorted(b["data_files"].items())]})
        infos.append({"config_name": name, "features": hf_features(b["height"], b["width"], b["num_frames"])})
    return {"license": info["license"], "pretty_name": info["title"], "tags": list(TAGS),
            "task_categories": ["text-to-video"], "size_categories": [size_category(info["total_samples"])],
            "configs": configs, "dataset_info": infos}
