"""Synthetic nuScenes writer speed: seconds per camera image, vs just JPEG-encoding+writing an image.

    python bench/synth.py [--scenes 1] [--seconds 4] [--image-size 1600x900]

Figure: wall and CPU seconds per image of write_dataset (world, tables, render, JPEG, truth).
Baseline, same run: encoding and writing the sky background of the same size as a JPEG the same
number of times (the unavoidable part). The ratio says what the rendering and tables add.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from _common import save  # also puts the repo root on sys.path

from pipeline.synth.writer import JPEG_QUALITY, write_dataset
from pipeline.synth.render import sky_background


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenes", type=int, default=1)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--image-size", default="1600x900")
    a = p.parse_args()
    w, h = (int(v) for v in a.image_size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        info = write_dataset(Path(tmp) / "ds", scenes=a.scenes, seconds=a.seconds, image_size=(w, h), seed=0)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        n = info.num_images
        base_dir = Path(tmp) / "base"
        base_dir.mkdir()
        img = sky_background(w, h)
        img[h // 2:] = 90
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(n):
            ok, data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            (base_dir / f"{i}.jpg").write_bytes(np.asarray(data).tobytes())
        b_wall, b_cpu = time.perf_counter() - t0, time.process_time() - c0
    figures = {"images": n, "bytes": info.num_bytes, "wall_s": wall, "cpu_s": cpu,
               "wall_s_per_image": wall / n, "cpu_s_per_image": cpu / n,
               "baseline_wall_s_per_image": b_wall / n, "baseline_cpu_s_per_image": b_cpu / n,
               "ratio_cpu_vs_baseline": cpu / max(b_cpu, 1e-9), "ratio_wall_vs_baseline": wall / max(b_wall, 1e-9),
               "config": {"scenes": a.scenes, "seconds": a.seconds, "image_size": [w, h]}}
    save(f"synth_{w}x{h}", figures,
         f"{n} images {info.num_bytes / 1e6:.1f} MB: {wall:.1f} s wall / {cpu:.1f} s CPU "
         f"({1e3 * cpu / n:.1f} ms CPU/img, {cpu / max(b_cpu, 1e-9):.2f}x a bare JPEG encode+write)")


if __name__ == "__main__":
    main()
