"""mdv2-synth (`python -m pipeline.synth`): the synthetic dataset writer's command line (pipeline/synth/writer.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.contract import cli, schema
from pipeline.synth.rig import BURST3_SHARE
from pipeline.synth.writer import DROP_RATE, write_dataset


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--image-size must look like 1600x900 (WxH), got {text!r}") from None
    return w, h


@cli.entry
def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(
        prog="mdv2-synth", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a synthetic dataset in the real nuScenes v1.0 layout that nuscenes-devkit's NuScenes\n"
                    "and NuScenesMap load unchanged: 13 tables in OUT/VERSION/, 6 cameras at ~12 Hz (samples/ +\n"
                    "sweeps/), LIDAR_TOP records, maps/expansion/MAP.json with the 8 map layers, and\n"
                    "OUT/synth_truth.parquet with the exact box of every object at every camera frame.\n"
                    "Same arguments give byte-identical files.",
        epilog="example: mdv2-synth --out /data/synth --scenes 2 --seconds 20   (about 175 MB, 2880 images)")
    p.add_argument("--out", required=True, type=Path, help="dataset root (the devkit's dataroot)")
    p.add_argument("--scenes", type=int, default=2, help="number of scenes (default 2)")
    p.add_argument("--seconds", type=float, default=20.0, help="scene length in seconds (default 20, like nuScenes)")
    p.add_argument("--image-size", type=_size, default=(1600, 900), help="camera image WxH (default 1600x900)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same arguments give identical bytes")
    p.add_argument("--version", default="v1.0-synth", help="table folder name (NuScenes(version=...))")
    p.add_argument("--map-name", default="singapore-onenorth", choices=schema.NUSCENES_MAPS,
                   help="log location / map-expansion name (must be a real nuScenes map name)")
    p.add_argument("--regular-rig", action="store_true",
                   help="the old rig: cameras every 83 ms, no dropped images, no mount tilt, no map holes")
    p.add_argument("--drop-rate", type=float, default=DROP_RATE,
                   help=f"share of each camera's non-keyframe images not recorded (default {DROP_RATE})")
    p.add_argument("--bursts", action="store_true",
                   help="drop images in bursts of 2 or 3 consecutive images of a camera, as real logs under load")
    p.add_argument("--burst3-share", type=float, default=BURST3_SHARE,
                   help=f"with --bursts: share of the bursts that are 3 images long (default {BURST3_SHARE})")
    p.add_argument("--tables-only", action="store_true",
                   help="tables + maps at nuScenes record counts, no rendering: camera/lidar records share a few "
                        "files, 5 radars added (the scale benchmark's data set; pipeline/synth/scale.py)")
    a = p.parse_args(argv)
    rig = dict(rig="regular" if a.regular_rig else "nuscenes", drop_rate=a.drop_rate, bursts=a.bursts,
               burst3_share=a.burst3_share)
    if a.tables_only:
        from pipeline.synth.scale import write_tables_only
        info = write_tables_only(a.out, a.scenes, a.seconds, a.image_size, a.seed, a.version, a.map_name,
                                 progress=True, **rig)
        print(f"wrote {len(info.scene_names)} scenes, records {info.extra['records']}, "
              f"{info.num_bytes / 1e6:.1f} MB in {info.seconds_taken:.1f} s -> {info.root}")
        return 0
    info = write_dataset(a.out, a.scenes, a.seconds, a.image_size, a.seed, a.version, a.map_name, progress=True,
                         **rig)
    print(f"wrote {len(info.scene_names)} scenes ({', '.join(info.scene_names)}), {info.num_samples} samples, "
          f"{info.num_annotations} annotations, {info.num_images} images, {info.num_bytes / 1e6:.1f} MB "
          f"in {info.seconds_taken:.1f} s -> {info.root} (version {info.version}, map {info.map_name})")
    return 0
