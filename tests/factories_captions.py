"""Caption-test data: camera JPEGs in the nuScenes layout (samples/<CAM>/...), a clip index with
the columns pipeline/scenes/buckets.py writes, shards + manifest whose meta.json frames point at
real JPEGs, and tiny multi-view mp4 / jpg-sequence folders."""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.contract import schema
from pipeline.contract.manifest import ShardRecord, write_manifest
from pipeline.contract.shardio import sha256_file

IMG_W, IMG_H = 96, 54


def colour(i: int, view: int = 0) -> tuple[int, int, int]:
    """A distinct, JPEG-stable colour per (frame id, view)."""
    return (40 + (i * 37) % 180, 40 + (i * 71 + view * 13) % 180, 40 + (view * 29) % 180)


def write_jpeg(path: Path, rgb: tuple[int, int, int], size=(IMG_W, IMG_H)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[:] = rgb
    arr[: size[1] // 3, :, :] = 255 - np.array(rgb, np.uint8)  # a band, so views are not flat
    Image.fromarray(arr).save(path, format="JPEG", quality=90)


def frame_path(scene: str, view: str, frame: int) -> str:
    return f"samples/{view}/{scene}__{view}__{frame:04d}.jpg"


def write_clip_dataset(root: Path, scenes: dict[str, int], num_frames: int = 9, stride: int = 8,
                       clips_per_scene: int = 2, height: int = 64, width: int = 128,
                       description: str = "Sunny, city street, parked cars.") -> pa.Table:
    """Write JPEGs for every frame of every scene and return the clip index.

    Clips of a scene start every `stride` frames; with stride < num_frames they overlap. Also
    writes v1.0-mini/scene.json with each scene's description (for mode 'dataset')."""
    rows, scene_recs = [], []
    for s_idx, (scene, n_frames) in enumerate(sorted(scenes.items())):
        scene_recs.append({"token": f"tok-{scene}", "name": scene, "description": f"{description} ({scene})"})
        for f in range(n_frames):
            for v_idx, view in enumerate(schema.VIEWS):
                write_jpeg(root / frame_path(scene, view, f), colour(s_idx * 100 + f, v_idx))
        for c in range(clips_per_scene):
            start = c * stride
            if start + num_frames > n_frames:
                break
            mid = start + (num_frames - 1) // 2
            frames = [[frame_path(scene, v, start + t) for v in schema.VIEWS] for t in range(num_frames)]
            rows.append({"key": schema.sample_key(scene, start, num_frames, height, width), "split": "train",
                         "dataset": "nuscenes", "scene_name": scene, "scene_token": f"tok-{scene}",
                         "start": start, "num_frames": num_frames, "height": height, "width": width,
                         "bucket": schema.bucket_name(height, width, num_frames), "middle_frame": mid,
                         "frames": frames, "middle_frame_paths": frames[(num_frames - 1) // 2]})
    (root / "v1.0-mini").mkdir(parents=True, exist_ok=True)
    (root / "v1.0-mini" / "scene.json").write_text(json.dumps(scene_recs))
    return pa.Table.from_pylist(rows)


def write_shards_with_frames(out: Path, dataroot: Path, buckets: dict, split: str = "train",
                             per_shard: int = 4) -> list[ShardRecord]:
    """tests/factories.write_shards + real JPEGs for each sample's middle frame + the split manifest."""
    from tests.factories import write_shards
    paths = write_shards(out, buckets, split=split, per_shard=per_shard)
    from pipeline.contract.shardio import iter_shard
    records = []
    for i, p in enumerate(sorted(paths)):
        keys = []
        for key, members in iter_shard(p):
            keys.append(key)
            meta = json.loads(members["meta.json"])
            h, w, t = meta["height"], meta["width"], meta["num_frames"]
            row = meta["frames"][(meta["num_frames"] - 1) // 2]
            for v_idx, rel in enumerate(row):
                write_jpeg(dataroot / rel, colour(zlib.crc32(key.encode()) % 997, v_idx))
        rel = str(p.relative_to(out))
        records.append(ShardRecord(path=rel, split=split, bucket=rel.split("/")[1], height=h, width=w,
                                   num_frames=t, samples=len(keys), bytes=p.stat().st_size,
                                   sha256=sha256_file(p), schema_version=schema.SCHEMA_VERSION,
                                   config_hash="test", keys=keys))
    write_manifest(str(out), split, records)
    return records


def write_mp4(path: Path, colours: list[tuple[int, int, int]], size=(64, 48)) -> None:
    import av
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=12)
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        for rgb in colours:
            arr = np.zeros((size[1], size[0], 3), np.uint8)
            arr[:] = rgb
            for pkt in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
