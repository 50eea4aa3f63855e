"""Generate an eval set: G seeded generations of every chosen clip of a split (docs/eval.md §1).

    mdv2-generate --ckpt RUN --vae VAE --data-root SHARDS --split val --bucket 848x1600_t17 \\
        --generations 4 --text-cache DIR --out evalset --frames 17 --cut 16
    torchrun --nproc_per_node 8 -m train.generate ... --sp 4    # 2 clips at a time, 4 GPUs each

Clips: `--clips FILE` (one sample key a line; # comments) or `--bucket B` (every clip of that
bucket) or neither (every clip of the split), sorted by key, the first `--limit K`. Generation g
of a clip uses the noise seed `--seed-base` + g (1024 + g, as the authors). Written per (key, g):

    OUT/<key>/g<gg>/<VIEW>.mp4                 H.264, the generated H x W
    OUT/<key>/g<gg>/frames/<VIEW>/<ttt>.png    lossless frames
    OUT/<key>/g<gg>/sample.json                its manifest row (config as an object) + caption
    OUT/manifest.parquet                       one row per complete generation, sorted by (key, g)

A generation is made in OUT/<key>/.g<gg>.tmp and renamed when complete, so a rerun skips the
complete ones and redoes a partial one; an OUT holds one generation config (a rerun with
other steps, scale, checkpoint, ... is refused). `--cut N` is recorded in the config for the
eval side (the protocol generates 17 frames and scores 16); every generated frame is written.

Under torchrun the world is dp x sp: clip i of the sorted list goes to data-parallel group
i mod dp; the ranks of a group split its tokens (--sp) and decode its views between them.
Exit codes: 0 complete, 2 a mistake on the command line (one `error:` line).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from pipeline.contract import cli, manifest, schema
from pipeline.contract.shardio import split_member_name
from train import checkpoint as ckpt
from train import clip_length
from train.buckets import bucket_of_url
from train.data import open_url
from train.sample import (Sampler, add_common_args, decode_config, decode_members, frames_arg, iter_members,
                          run_config, split_urls, start, stop)
from train.video import write_mp4, write_pngs

MANIFEST = "manifest.parquet"
BASE_SEED = 1024  # the authors' first seed
# what makes two generations comparable; an OUT holds one of these (device, sp and world do not matter)
RECIPE = ("ckpt", "weights", "steps", "cfg_scale", "frames", "cut", "base_seed", "split", "vae", "precision")
MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("generation", pa.int64()), ("seed", pa.int64()), ("split", pa.string()),
    ("bucket", pa.string()), ("num_frames", pa.int64()), ("height", pa.int64()), ("width", pa.int64()),
    ("views", pa.list_(pa.string())), ("source_frames", pa.list_(pa.list_(pa.string()))),
    ("timestamps_us", pa.list_(pa.int64())), ("view_timestamps_us", pa.list_(pa.list_(pa.int64()))),
    ("source_size", pa.list_(pa.list_(pa.int64()))), ("fill_mask", pa.list_(pa.list_(pa.bool_()))),
    ("dir", pa.string()), ("config", pa.string()),
])


def gen_dir(key: str, g: int) -> str:
    return f"{key}/g{g:02d}"


# ---- which clips -----------------------------------------------------------------------------

def shard_keys(url: str) -> list[str]:
    """The sample keys of a shard in tar order, from the tar headers (a local shard is not read through)."""
    with open_url(url) as f:
        seekable = getattr(f, "seekable", lambda: False)()
        with tarfile.open(fileobj=f, mode="r:" if seekable else "r|") as tar:
            return list(dict.fromkeys(split_member_name(i.name)[0] for i in tar if i.isfile()))


def index_split(urls: dict[str, list[str]]) -> dict[str, tuple[str, str]]:
    """key -> (bucket name, shard URL) for every clip of a split."""
    out: dict[str, tuple[str, str]] = {}
    for bucket, shards in urls.items():
        for url in shards:
            for key in shard_keys(url):
                out.setdefault(key, (bucket, url))
    return out


def select_clips(index: dict[str, tuple[str, str]], split: str, clips_file: str | None, bucket: str | None,
                 limit: int | None) -> list[str]:
    """The sorted clip keys to generate; a key or bucket the split lacks is a user error naming it."""
    if clips_file:
        path = Path(clips_file)
        if not path.is_file():
            raise cli.InputNotFound(f"--clips {clips_file}: no such file (one sample key a line)")
        keys = list(dict.fromkeys(line.split("#", 1)[0].strip() for line in path.read_text().splitlines()))
        keys = [k for k in keys if k]
        if not keys:
            raise cli.BadInput(f"--clips {clips_file}: no keys in the file (one sample key a line)")
        missing = [k for k in keys if k not in index]
        if missing:
            buckets = sorted({b for b, _ in index.values()})
            raise cli.UnknownName(f"--clips {clips_file}: {len(missing)} key(s) not in split {split!r}: "
                                  + ", ".join(repr(k) for k in missing[:5]) + (" ..." if len(missing) > 5 else "")
                                  + f" (the split has {len(index)} clips in buckets {buckets})")
        keys = keys[:limit] if limit else keys
    else:
        buckets = sorted({b for b, _ in index.values()})
        if bucket and bucket not in buckets:
            raise cli.UnknownName(f"--bucket {bucket!r}: not a bucket of split {split!r}; its buckets: {buckets}")
        keys = sorted(k for k, (b, _) in index.items() if bucket in (None, b))
        keys = keys[:limit] if limit else keys
    return sorted(keys)


# ---- one generation's record ------------------------------------------------------------------------

def fill_mask(members: dict, meta: dict, t: int, v: int) -> list[list[bool]]:
    """(T, V) bool: True where the image of view v at frame t is a repaired drop (schema 3.0:
    fill_mask.npy, or meta "filled"); all False for shards that record no repairs."""
    if "fill_mask.npy" in members:
        return np.asarray(schema.npy_load(members["fill_mask.npy"], "fill_mask.npy"), bool)[:t].tolist()
    mask = np.zeros((t, v), bool)
    for ft, fv in meta.get("filled", []):
        if ft < t:
            mask[ft, fv] = True
    return mask.tolist()


def manifest_row(key: str, g: int, config: dict, s: dict, meta: dict, members: dict, bucket: str) -> dict:
    """The manifest row of generation g of a clip (INTERFACES.md E), config as an object."""
    t, views = s["shape"][2], list(meta["views"])
    return {"key": key, "generation": g, "seed": config["base_seed"] + g, "split": config["split"],
            "bucket": bucket, "num_frames": t, "height": s["shape"][0], "width": s["shape"][1], "views": views,
            "source_frames": [list(r) for r in meta["frames"][:t]],
            "timestamps_us": [int(x) for x in meta["timestamps_us"][:t]],
            "view_timestamps_us": [[int(x) for x in r] for r in meta["view_timestamps_us"][:t]],
            "source_size": [[int(x) for x in wh] for wh in meta["source_size"]] if "source_size" in meta else None,
            "fill_mask": fill_mask(members, meta, t, len(views)), "dir": gen_dir(key, g), "config": config}


def read_record(out: Path, key: str, g: int) -> dict | None:
    """The sample.json of a complete generation, else None (missing, or a folder without one: partial)."""
    p = out / gen_dir(key, g) / "sample.json"
    return json.loads(p.read_text()) if p.is_file() else None


def check_recipe(out: Path, config: dict) -> None:
    """An OUT holds one generation config: refuse to add generations made another way."""
    for p in sorted(out.glob("*/g*/sample.json"))[:1] if out.is_dir() else []:
        theirs = json.loads(p.read_text())["config"]
        diff = [k for k in RECIPE if theirs.get(k) != config.get(k)]
        if diff:
            raise cli.BadInput(f"--out {out} holds generations made with "
                               + ", ".join(f"{k}={theirs.get(k)!r}" for k in diff) + " (this run: "
                               + ", ".join(f"{k}={config.get(k)!r}" for k in diff) + "); use another --out")


def write_manifest(out: Path) -> tuple[str, int]:
    """OUT/manifest.parquet from every complete generation under OUT, sorted by (key, generation)."""
    rows = [json.loads(p.read_text()) for p in out.glob("*/g*/sample.json")]
    rows = sorted(({k: (json.dumps(r[k], sort_keys=True) if k == "config" else r[k]) for k in MANIFEST_SCHEMA.names}
                   for r in rows), key=lambda r: (r["key"], r["generation"]))
    uri = str(out / MANIFEST)
    manifest.write_table(uri, pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA))
    return uri, len(rows)


def write_views(folder: Path, frames: dict[int, np.ndarray], views: list[str], fps: int) -> None:
    """<VIEW>.mp4 and frames/<VIEW>/<ttt>.png (lossless) of the views given."""
    for v, video in frames.items():
        write_pngs(folder / "frames" / views[v], video)
        write_mp4(folder / f"{views[v]}.mp4", video, fps=fps)


def check_length(key: str, clip_frames: int, frames: int | None) -> None:
    if frames and frames > clip_frames:
        raise cli.BadInput(f"--frames {frames}: clip {key} has {clip_frames} frames; an eval set compares with the "
                           f"real frames, so generate at most the clip's length (or pick a longer bucket)")


# ---- the run ------------------------------------------------------------------------------

def generate(a: argparse.Namespace) -> dict:
    cfg = run_config(a.ckpt, a.data_root, a.text_encoder, a.text_cache)   # a wrong --ckpt fails first
    decode_cfg = decode_config(a)
    out = Path(a.out)
    index = index_split(split_urls(cfg, a.split))
    keys = select_clips(index, a.split, a.clips, a.bucket, a.limit)
    for key in keys:
        t = bucket_of_url(index[key][1])[2]
        if t != "full":
            check_length(key, t, a.frames)
    rt = start(a.device, a.sp, a.precision)
    topo = rt.topo
    config = {"ckpt": str(ckpt.resolve(a.ckpt).resolve()), "weights": a.weights,
              "steps": a.steps or cfg.flow.sample_steps,
              "cfg_scale": cfg.flow.cfg_scale if a.cfg_scale is None else a.cfg_scale, "frames": a.frames,
              "cut": a.cut, "base_seed": a.seed_base, "split": a.split, "vae": str(Path(a.vae).resolve()),
              "precision": "bf16" if rt.autocast else "fp32", "tiling": decode_cfg.tiling,
              "tile": [decode_cfg.tile_height, decode_cfg.tile_width]}
    check_recipe(out, config)
    mine = keys[topo.dp_rank::topo.dp]          # clip i -> data-parallel group i mod dp
    todo = {k: [g for g in range(a.generations) if read_record(out, k, g) is None] for k in mine}
    todo = {k: gs for k, gs in todo.items() if gs}
    n_todo = sum(len(gs) for gs in todo.values())
    if rt.main:
        print(f"generate: {len(keys)} clips x {a.generations} generations of split {a.split}; on dp group 0: "
              f"{n_todo} to make of {len(mine) * a.generations} (dp {topo.dp} x sp {topo.sp})", file=sys.stderr)
    bar = tqdm(total=n_todo, desc="generate", disable=a.no_progress or not rt.main, dynamic_ncols=True)
    sampler = Sampler(rt, a.ckpt, a.vae, cfg, a.weights, decode_cfg) if todo else None
    made = 0
    urls = sorted({index[k][1] for k in todo})
    for key, members, url in iter_members(urls):       # each shard read once, in order
        if key not in todo:
            continue
        s, meta = decode_members(key, members, url)
        check_length(key, s["shape"][2], a.frames)            # a "full" clip's length is known only now
        s = clip_length.fit_frames(s, a.frames or s["shape"][2])
        for g in todo.pop(key):
            folder, tmp = out / gen_dir(key, g), out / key / f".g{g:02d}.tmp"
            if topo.sp_rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.rmtree(folder, ignore_errors=True)   # partial: a folder without sample.json
                tmp.mkdir(parents=True)
            rt.sp_barrier()
            lat = sampler.latents(s, a.seed_base + g, config["steps"], config["cfg_scale"], not a.no_progress)
            frames = sampler.decode(lat, rt.my_views(lat.shape[0]), float(meta["vae"]["scaling_factor"]))
            write_views(tmp, frames, list(meta["views"]), int(meta["fps"]))
            rt.sp_barrier()                                 # every view of the group written
            if topo.sp_rank == 0:
                record = dict(manifest_row(key, g, config, s, meta, members, index[key][0]), caption=s["caption"])
                (tmp / "sample.json").write_text(json.dumps(record, indent=1))
                os.replace(tmp, folder)
            made += 1
            bar.update(1)
    bar.close()
    made = rt.wait_all(made if topo.sp_rank == 0 else 0)   # every group done before the manifest
    summary = {"clips": len(keys), "generations": a.generations, "generated": made,
               "skipped": len(keys) * a.generations - made}
    if rt.main:
        summary["manifest"], summary["rows"] = write_manifest(out)
    stop()
    return summary


@cli.entry(user_errors=(schema.SchemaError,))
def main(argv: list[str] | None = None) -> int:
    ap = cli.ArgumentParser(prog="mdv2-generate", formatter_class=argparse.RawDescriptionHelpFormatter,
                            description=__doc__)
    add_common_args(ap)
    ap.add_argument("--out", required=True, help="eval set folder: <key>/g<gg>/..., manifest.parquet")
    ap.add_argument("--split", default="val", help="split the clips come from (default: %(default)s)")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--clips", metavar="FILE", help="file of sample keys, one a line (# comments)")
    which.add_argument("--bucket", help="every clip of this bucket, e.g. 848x1600_t17")
    ap.add_argument("--limit", type=int, help="the first K clips (sorted by key; --clips: in file order)")
    ap.add_argument("--generations", type=int, default=4, help="seeded generations per clip (default: %(default)s, "
                    "the protocol's)")
    ap.add_argument("--seed-base", type=int, default=BASE_SEED, help="generation g uses seed BASE + g "
                    "(default: %(default)s, the authors')")
    ap.add_argument("--frames", type=int, help="frames to generate, 4k+1, at most the clip's (default: the clip's "
                    "own; the protocol: 17)")
    ap.add_argument("--cut", type=int, help="frames the eval side scores (recorded in the config; the protocol: 16)")
    a = ap.parse_args(argv)
    frames_arg(a.frames)
    for name in ("limit", "generations"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise cli.BadInput(f"--{name} {getattr(a, name)}: must be at least 1")
    if a.cut is not None and not (1 <= a.cut <= (a.frames or a.cut)):
        raise cli.BadInput(f"--cut {a.cut}: must be between 1 and --frames {a.frames}")
    summary = generate(a)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
