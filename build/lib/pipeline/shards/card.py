"""The dataset card: README.md beside the shards (Hugging Face YAML front matter + the facts a stranger needs
to decode every member with numpy alone) and info.json, the same facts for programs (pipeline/shards/cardinfo.py).

Written by every command that changes the dataset: the build (``write_card``), re-captioning
(``captions/regenerate.py``) and ``mdv2-stats`` (``refresh_card``: the build's part is read back from info.json,
the contents from the manifests, so a refresh never forgets what the build knew). The decoding snippet of
the card is run by tests/test_card.py on every member of every demo shard.
"""
from __future__ import annotations

import json
from typing import Any

import yaml

from pipeline.contract import schema, storage
from pipeline.contract.manifest import ShardRecord, read_manifest, read_quarantine
from pipeline.shards.cardinfo import META_DOC, dataset_info, front_matter
from pipeline.shards.yieldcard import yield_markdown

SNIPPET_HEADING = "### Decoding with numpy only"

# Runs as it is (tests/test_card.py): standard library + numpy, nothing of this project.
SNIPPET = '''import io, json, tarfile
import numpy as np

def read_shard(path):
    """Yield (key, {member: value}) per sample of one shard, in order: arrays, meta dict, caption str."""
    samples = {}
    with tarfile.open(path) as tar:
        for info in tar:
            if not info.isfile():
                continue
            # "<key>.<member>": keys have no dots; members do ("boxes.npy")
            key, member = info.name.rsplit("/", 1)[-1].split(".", 1)
            data = tar.extractfile(info).read()
            if member.endswith(".npy"):
                value = np.load(io.BytesIO(data), allow_pickle=False)
            elif member.endswith(".json"):
                value = json.loads(data)
            else:
                value = data.decode("utf-8")
            samples.setdefault(key, {})[member] = value
    yield from samples.items()

def bev_masks(sample):
    """bev.npy (T, 8, G, G/8) uint8 -> (T, 8, G, G) bool; bits packed along the last axis, first column in
    the most significant bit (np.packbits' default, big-endian)."""
    return np.unpackbits(sample["bev.npy"], axis=-1, count=sample["meta.json"]["bev"]["cells"]).astype(bool)

def latents(sample, rng=None):
    """The latents a model trains on: z = s * (mean + std * eps), or z = s * mean without latent_std.npy."""
    s = sample["meta.json"]["vae"]["scaling_factor"]
    mean = sample["latent_mean.npy"].astype(np.float32)          # (V, 16, T', H/8, W/8)
    if "latent_std.npy" not in sample:
        return s * mean
    eps = (rng or np.random.default_rng()).standard_normal(mean.shape, dtype=np.float32)
    return s * (mean + sample["latent_std.npy"].astype(np.float32) * eps)

def project(sample, t, v, points_lidar):
    """(P, 3) points in LiDAR(t) at view v's exposure -> (P, 2) pixels of the stored image, (P,) depth."""
    lidar2cam = np.linalg.inv(sample["cam2lidar.npy"][t, v].astype(np.float64))
    cam = points_lidar @ lidar2cam[:3, :3].T + lidar2cam[:3, 3]    # camera: x right, y down, z forward
    uvw = cam @ sample["intrinsics.npy"][v].astype(np.float64).T
    return uvw[:, :2] / uvw[:, 2:3], cam[:, 2]
'''


def _members_table(info: dict) -> str:
    rows = ["| member | dtype | shape (axes) | units | frame | padding / presence | meaning |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, f in info["features"].items():
        shape = ", ".join(f"{s} {n}" for s, n in zip(f.get("shape", []), f.get("names", [])))
        presence = f.get("padding", "") or ("" if f["required"] else "optional")
        rows.append(f"| `{name}` | {f['dtype']} | {('(' + shape + ')') if shape else '-'} | {f.get('units', '')} "
                    f"| {f.get('frame', '')} | {presence} | {f['doc']} |")
    return "\n".join(rows)


def _meta_table() -> str:
    def typ(t: Any) -> str:
        if isinstance(t, str):
            return t
        if isinstance(t, list):
            return f"list<{typ(t[0])}>"
        return "{" + ", ".join(f"{k}: {typ(v)}" for k, v in t.items()) + "}"
    rows = ["| field | type | meaning |", "| --- | --- | --- |"]
    rows += [f"| `{k}` | {typ(t)} | {d} |" for k, (t, d) in META_DOC.items()]
    return "\n".join(rows)


def _buckets_table(info: dict) -> str:
    rows = ["| bucket (config) | H x W | T | T' | latent h x w | BEV G x cell | splits: shards / samples / MB |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, b in info["buckets"].items():
        splits = "; ".join(f"{s}: {v['shards']} / {v['samples']} / {v['bytes'] / 1e6:.2f}" for s, v in b["splits"].items())
        rows.append(f"| `{name}` | {b['height']} x {b['width']} | {b['num_frames']} | {b['latent_frames']} | "
                    f"{b['latent_size'][0]} x {b['latent_size'][1]} | {b['bev']['cells']} x {b['bev']['cell_m']} m "
                    f"| {splits} |")
    return "\n".join(rows)


def _classes() -> str:
    by_class: dict[str, list[str]] = {}
    for cat, c in sorted(schema.NUSCENES_CATEGORY_TO_CLASS.items()):
        by_class.setdefault(c, []).append(f"`{cat}`")
    rows = ["| id | class | nuScenes categories |", "| --- | --- | --- |"]
    rows += [f"| {i} | {c} | {', '.join(by_class.get(c, []))} |" for i, c in enumerate(schema.OBJECT_CLASSES)]
    rows += ["", "| channel | map class | drawn as |", "| --- | --- | --- |"]
    rows += [f"| {i} | {c} | {'line (dilated)' if c in schema.MAP_LINE_CLASSES else 'polygon'} |"
             for i, c in enumerate(schema.MAP_CLASSES)]
    return "\n".join(rows)


def _captions(info: dict) -> str:
    parts = []
    for c in info["captions"]:
        extra = ", ".join(f"{k} {c[k]}" for k in ("model", "prompt_version") if c.get(k))
        parts.append(f"{c['source']}{f' ({extra})' if extra else ''}: {c['samples']} samples")
    return "; ".join(parts) or "none"


def _stats(info: dict) -> str:
    st = info.get("stats")
    if not st:
        return ("Not computed yet: `mdv2-stats <this folder>` writes `stats.md`, `stats.png` and `stats.json` "
                "(samples and hours per bucket, classes, objects per frame, caption lengths and sources, per-view "
                "exposure offsets and box visibility) and updates this card.")
    opf = st.get("objects_per_frame", {})
    return (f"From `mdv2-stats` (`stats.md`, `stats.json`): {st.get('samples_read', 0)} samples read, objects per "
            f"frame mean {opf.get('mean')} (max {opf.get('max')}), objects per class "
            f"{json.dumps(st.get('class_objects', {}), sort_keys=True)}.")


def render(info: dict) -> str:
    """README.md from info.json's dict."""
    b = info["build"]
    tiny = " — TINY RANDOM WEIGHTS: the latents are meaningless" if b.get("tiny_vae") else ""
    rows = "\n".join(f"| {s} | {name} | {v['shards']} | {v['samples']} | {v['bytes'] / 1e6:.2f} |"
                     for s, per in info["splits"].items() for name, v in per.items())
    first = next(iter(info["buckets"]), "<bucket>")
    grids = ", ".join(f"{g['cells']} x {g['cells']} cells of {g['cell_m']} m" for g in info["bev"]["grids"])
    yaml_text = yaml.safe_dump(front_matter(info), sort_keys=False, allow_unicode=True, width=1000)
    status = b.get("status") or "complete"   # the build's BuildSummary.status(): complete, or INCOMPLETE: why
    status = ("Status: complete (every planned shard is listed in its manifest)." if status == "complete" else
              f"**Status: {status}.** The tables below count only the shards written so far.")
    return f"""---
{yaml_text}---

# {info['title']}

{status}

Webdataset shards of multi-view driving clips with CogVideoX-VAE latents and their conditions (3-D boxes per
view, cameras, ego trajectory, BEV map, caption), written by `pipeline/build.py` (pipeline
{info['codebase_version']}, sample schema {info['schema_version']}). One clip = one sample; key
`{info['key_template']}`. The same facts for programs: `{schema.DATASET_INFO_FILE}`.

## Source
- dataset: {b.get('dataset')} (`{b.get('version')}` at `{b.get('dataroot')}`), scenes: {b.get('scenes')}
- stage config: {b.get('stage')}
- VAE: {json.dumps(b.get('vae'), sort_keys=True)}{tiny}
- captions: {_captions(info)}
- config hash: `{b.get('config_hash')}`
- license: `{info['license']}`: {info['license_note']}

## Contents
| split | bucket | shards | samples | MB |
| --- | --- | --- | --- | --- |
{rows}

Quarantined items (see `{schema.QUARANTINE_FILE}`): {info['quarantined']}.
{yield_markdown(b.get('yield'))}
Each split has a `manifest.parquet` (path, bucket, samples, bytes, sha256, schema version, config hash,
keys); a reader trusts only shards listed there. Shards: `{info['shard_template']}`.

## Buckets (one Hugging Face config each)
{_buckets_table(info)}

## Reading
- Hugging Face: `datasets.load_dataset("<this folder>", "{first}")` gives that bucket only (its splits);
  `.with_format("numpy", dtype=None)` keeps every member's dtype (float16 latents).
- webdataset, Ray Data and a torch IterableDataset: docs/dataset.md of the code base.
- Decode one sample with this code base: `pipeline.contract.schema.decode_sample(members)`.

{SNIPPET_HEADING}
```python
{SNIPPET.rstrip()}
```

## Sample members
Axis sizes: V views (in meta `views` order: {', '.join(info['views'])}), T frames at {info['fps']} Hz,
T' = (T - 1) / 4 + 1 latent frames, N objects of the clip (varies per sample: pad it to batch; the masks
say what is real), G BEV cells (per bucket, meta `bev`).

{_members_table(info)}

### meta.json
{_meta_table()}

## Classes
{_classes()}

## Coordinates and time
- {info['coordinates']['lidar']}. `traj[t]` maps LiDAR(t) to LiDAR(0); `cam2lidar[t, v]` maps camera v at
  its own exposure (through its own ego pose) to LiDAR(t). Transforms are 4 x 4 homogeneous, metres.
- Box: {info['coordinates']['box']}. Corners: centre ± (l/2 along the heading, w/2 across, h/2 up).
- Time: {info['coordinates']['time']}; `boxes` are at the reference camera's ({info['reference_view']})
  exposure, `view_boxes[t, v]` at view v's. A dropped image is repaired with the nearest image of the same
  camera (`fill_mask`, meta `filled`); every member of that view-frame describes the image actually used.

## Camera model
{info['camera']['model']}, no distortion; camera axes {info['camera']['camera_axes']};
{info['camera']['projection']}. `intrinsics` is K at the stored H x W: {info['camera']['resize_rule']}.
`source_intrinsics` is K of the source image (meta `source_size`). `project()` in the snippet above.

## BEV grid
`bev[t, c, i, j]`: map class c (table above) around LiDAR(t), {info['bev']['extent_m']:g} m x
{info['bev']['extent_m']:g} m: {grids} (the large grid from height {info['bev']['min_height_for_large_grid']}).
Row i covers y = {info['bev']['row_i_y_m']}, column j covers x = {info['bev']['col_j_x_m']}: as an image,
ahead is up and right is right. Bits are packed along the last axis with `numpy.packbits` (bit order big:
column 8k is the most significant bit of byte k); `bev_masks()` in the snippet unpacks them.

## Statistics
{_stats(info)}

## More
- a picture of one sample: `mdv2-inspect <shard.tar> --dataroot <source root> --png preview.png`; in 3-D with
  Rerun: `mdv2-inspect <shard.tar> --rerun sample.rrd`;
- training: `python -m train.train --data-root <this folder> ...` (docs/train.md).
"""


def write_card(out: str, records: list[ShardRecord], quarantined: int, build: dict[str, Any],
               captions: list[dict] | None = None, stats: dict | None = None) -> str:
    """Write info.json and README.md under ``out``; returns the card's text."""
    info = dataset_info(sorted(records, key=lambda r: r.path), build, quarantined, captions, stats)
    storage.atomic_write(storage.join(out, schema.DATASET_INFO_FILE),
                         (json.dumps(info, indent=1, sort_keys=False) + "\n").encode())
    text = render(info)
    storage.atomic_write(storage.join(out, schema.DATASET_CARD_FILE), text.encode())
    return text


def read_info(out: str) -> dict | None:
    uri = storage.join(out, schema.DATASET_INFO_FILE)
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


def refresh_card(out: str, captions: list[dict] | None = None, stats: dict | None = None) -> str | None:
    """Rewrite the card after a command changed the dataset (captions, stats): the build's part from info.json,
    shards from the manifests, what is not given from the last info.json. None when there is no info.json
    (a folder not written by this pipeline's build)."""
    old = read_info(out)
    if old is None:
        return None
    splits = sorted(old.get("splits", {}))
    records = [r for s in splits for r in read_manifest(out, s)]
    build = {**old["build"], "title": old.get("title"), "license": old.get("license")}
    return write_card(out, records, len(read_quarantine(out)), build,
                      captions if captions is not None else old.get("captions"),
                      stats if stats is not None else old.get("stats"))


def caption_sources(metas: list[dict]) -> list[dict]:
    """[{source, model, prompt_version, samples}] counted over samples' meta.json (sorted)."""
    counts: dict[tuple, int] = {}
    for m in metas:
        c = m.get("caption") or {}
        k = (c.get("source"), c.get("model"), c.get("prompt_version"))
        counts[k] = counts.get(k, 0) + 1
    return [{"source": s, "model": mo, "prompt_version": p, "samples": n}
            for (s, mo, p), n in sorted(counts.items(), key=lambda kv: tuple(str(x) for x in kv[0]))]
