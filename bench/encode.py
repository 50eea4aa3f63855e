"""Frames, encoder and build throughput (issue 6).

1. decode + resize + crop to 424x800, frames/s on ONE core: ours (PIL draft/DCT scaling + area
   resize) vs the baseline (full-size cv2.imread + cv2.resize INTER_AREA), same 1600x900 JPEGs,
   plus the PSNR between the two outputs (quality check of the reduced-size decode).
2. VAE encode frames/s of the tiny CogVAE on CPU (one thread), and the FLOP floor of the real
   VAE: FLOP per input pixel-frame measured with torch's FlopCounterMode on the CogVideoX-2b
   architecture (random weights), so that on a GPU  fraction = fps * H * W * flop_per_px / peak.
   With --gpu-peak-tflops and a CUDA device it also times the real-size VAE in bf16.
3. End-to-end clips/s of pipeline/build.py (embedded Ray, 2 CPUs, tiny VAE, the build-test
   stage, scene stores already built) vs decode + encode of the same clips serially, the VAE
   on one torch thread in both (the actor's --encode-cpus 1 = one thread). `build_vs_serial`:
   whole commands from a cold interpreter (both pay the imports and the model load; the
   build also Ray's start, the scenes stage and the writing); `build_vs_serial_loop`: the
   build command against the warm loop alone (the old figure); `encode_write_vs_serial`: the
   encode+write stage, less its wait for the actor's model load, against the warm loop
   (`..._incl_model_wait` with it). `build_timeline`: Ray's task timeline per stage (busy
   seconds, span, busy share; pipeline/tools/timeline.py).

    python bench/encode.py [--quick] [--build-only] [--build-seconds 6]
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time
from pathlib import Path

from _common import Timer, save  # noqa: F401  (adds the repo root to sys.path)

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def bench_frames(root: str, n: int) -> dict:
    import cv2
    from pipeline.shards.frames import decode_resize_crop, full_decode_resize_crop
    cv2.setNumThreads(1)
    paths = sorted(glob.glob(f"{root}/samples/*/*.jpg") + glob.glob(f"{root}/sweeps/*/*.jpg"))[:n]
    out = {}
    for name, fn in (("draft", lambda p: decode_resize_crop(p, 800, 424)),
                     ("full_cv2", lambda p: full_decode_resize_crop(p, 800, 424))):
        fn(paths[0])
        with Timer() as t:
            for p in paths:
                fn(p)
        out[name] = len(paths) / t.seconds
    psnr = []
    for p in paths[:20]:
        a = decode_resize_crop(p, 800, 424).astype(np.float64)
        b = full_decode_resize_crop(p, 800, 424).astype(np.float64)
        psnr.append(10 * np.log10(255 ** 2 / max(np.mean((a - b) ** 2), 1e-12)))
    return {"decode_fps_per_core": out["draft"], "baseline_fps_per_core": out["full_cv2"],
            "speedup": out["draft"] / out["full_cv2"], "psnr_db_vs_baseline": float(np.mean(psnr)),
            "frames": len(paths), "jpeg_kb": float(np.mean([os.path.getsize(p) for p in paths]) / 1024)}


def flop_per_pixel_frame() -> float:
    """Real CogVideoX-2b VAE encoder architecture (diffusers defaults), counted on 1x3x9x64x64."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from diffusers import AutoencoderKLCogVideoX
    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX().eval()
    x = torch.zeros(1, 3, 9, 64, 64)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        vae.encode(x)
    return fc.get_total_flops() / (9 * 64 * 64)


def bench_vae(vae_dir: str) -> dict:
    import torch
    from pipeline.shards.encode import EncodeConfig, VaeEncoder
    torch.set_num_threads(1)
    enc = VaeEncoder(EncodeConfig(vae=vae_dir, device="cpu"))
    x = np.random.default_rng(0).integers(0, 256, (1, 17, 64, 128, 3), dtype=np.uint8)  # (V, T, H, W, 3)
    enc.encode(x[:, :9])
    with Timer() as t:
        for _ in range(3):
            enc.encode(x)
    return {"tiny_vae_cpu_fps_64x128": 3 * 17 / t.seconds}


def bench_gpu(peak_tflops: float, flop_px: float) -> dict:
    import torch
    from diffusers import AutoencoderKLCogVideoX
    if not torch.cuda.is_available():
        return {}
    vae = AutoencoderKLCogVideoX().to("cuda", torch.bfloat16).eval()
    x = torch.rand(1, 3, 17, 424, 800, device="cuda", dtype=torch.bfloat16) * 2 - 1
    with torch.inference_mode():
        vae.encode(x)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            vae.encode(x)
        torch.cuda.synchronize()
    fps = 3 * 17 / (time.perf_counter() - t0)
    return {"real_vae_gpu_fps_424x800": fps, "flop_floor_fraction": fps * 424 * 800 * flop_px / (peak_tflops * 1e12)}


def bench_build(root: str, version: str, vae_dir: str, out: str, cpus: int = 2) -> dict:
    """The whole build command (embedded Ray on ``cpus`` CPUs, scene stores already there) against the same
    clips decoded and encoded serially, the VAE on one torch thread in both (the build's actor gets
    --encode-cpus 1 = one thread; its other CPU decodes and writes)."""
    import subprocess
    from pipeline.contract import schema
    from pipeline.scenes.buckets import read_clip_index
    from pipeline.tools.timeline import read_timeline, stage_busy
    stage = str(REPO / "tests" / "data" / "build_test_stage.yaml")
    timeline = os.path.join(os.path.dirname(out), "timeline.json")
    cmd = [sys.executable, str(REPO / "pipeline" / "build.py"), "--config", stage, "--dataroot", root, "--version",
           version, "--out", out, "--vae", vae_dir, "--cpus", str(cpus), "--no-progress"]
    subprocess.run(cmd, check=True, capture_output=True)  # scene stores + warm file cache
    for d in glob.glob(f"{out}/*/"):
        if not d.rstrip("/").endswith(schema.WORK_DIR):
            subprocess.run(["rm", "-rf", d], check=True)
    with Timer() as t:
        run = subprocess.run(cmd + ["--timeline", timeline], check=True, capture_output=True, text=True)
    stage_s = {k: float(v) for line in run.stdout.splitlines() if line.startswith("seconds:")
               for k, v in (part.strip().rsplit(" ", 1) for part in line[8:].split(","))}
    busy = stage_busy(read_timeline(timeline))
    clips = read_clip_index(out).to_pylist()

    # the baseline twice: as a whole command from a cold interpreter (imports, model load: the footing of
    # the build command) and as the warm loop alone (the encode+write stage's footing)
    with Timer() as cold:
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--serial", root, out, vae_dir], check=True)
    serial_s = serial_loop(root, out, vae_dir)
    run_s = busy.get("EncodeActor.run", {}).get("busy_s", 0.0)
    # the serial loop is timed after its model load; the stage waits for the actor's model load when the
    # scenes stage ends first (timeline: the actor's __init__ ends after the first frames task starts), so
    # that wait is taken out for the like-for-like figure (and paid in the whole-command figure)
    init_end = busy.get("EncodeActor.__init__", {}).get("end_s", 0.0)
    model_wait = max(0.0, init_end - busy.get("frames_task", {}).get("start_s", init_end))
    return {"encode_write_vs_serial_incl_model_wait": serial_s / stage_s["encode+write"],
            "actor_model_load_wait_s": model_wait,
            "encode_write_vs_serial": serial_s / max(stage_s["encode+write"] - model_wait, 1e-9),
"build_clips_per_s": len(clips) / t.seconds, "build_seconds_incl_ray_start": t.seconds,
            "build_stage_seconds": stage_s, "encode_write_stage_clips_per_s": len(clips) / stage_s["encode+write"],
            "serial_decode_encode_clips_per_s": len(clips) / serial_s, "serial_command_seconds": cold.seconds,
            "vae_torch_threads": 1, "build_cpus": cpus, "clips": len(clips),
            "build_vs_serial": cold.seconds / t.seconds, "build_vs_serial_loop": serial_s / t.seconds,
            # where the time went (Ray's task timeline): busy seconds per stage, and the encoder's busy share
            # of the encode+write stage (1.0 = the VAE never waited for frames or for its own model load)
            "build_timeline": busy, "encoder_busy_share_of_encode_write": run_s / stage_s["encode+write"]}


def serial_loop(root: str, out: str, vae_dir: str) -> float:
    """Decode + encode every clip of the build's clip index in this process, one clip after the other, with
    the VAE on one torch thread like the build's actor (no Ray, no writing, no latent reuse): seconds."""
    from pipeline.scenes.buckets import read_clip_index
    from pipeline.shards.encode import EncodeConfig, VaeEncoder
    from pipeline.shards.frames import decode_frames
    clips = read_clip_index(out).to_pylist()
    enc = VaeEncoder(EncodeConfig(vae=vae_dir, device="cpu", torch_threads=1))
    with Timer() as e:
        for c in clips:
            fs = decode_frames(root, [p for row in c["frames"] for p in row], c["width"], c["height"])
            idx = fs.index()
            enc.encode(fs.pixels[np.array([[idx[p] for p in row] for row in c["frames"]]).T])  # (V, T, H, W, 3)
    return e.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer frames")
    ap.add_argument("--gpu-peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    ap.add_argument("--build-seconds", type=float, default=6.0, help="scene length of the build comparison (2 scenes)")
    ap.add_argument("--build-only", action="store_true", help="only the build vs serial comparison")
    ap.add_argument("--serial", nargs=3, metavar=("ROOT", "OUT", "VAE"), help=argparse.SUPPRESS)  # the baseline command
    a = ap.parse_args()
    if a.serial:
        serial_loop(*a.serial)
        return
    from pipeline.synth.writer import write_dataset
    from pipeline.shards.vae import write_tiny_vae
    figs = {}
    with tempfile.TemporaryDirectory() as tmp:
        vae_dir = write_tiny_vae(Path(tmp) / "tiny-cogvae")
        if not a.build_only:
            big = write_dataset(Path(tmp) / "big", scenes=1, seconds=2.0 if a.quick else 4.0, image_size=(1600, 900))
            figs.update(bench_frames(str(big.root), 48 if a.quick else 144))
            figs.update(bench_vae(vae_dir))
            figs["real_vae_mflop_per_pixel_frame"] = flop_per_pixel_frame() / 1e6
            figs.update(bench_gpu(a.gpu_peak_tflops, figs["real_vae_mflop_per_pixel_frame"] * 1e6))
        small = write_dataset(Path(tmp) / "small", scenes=2, seconds=a.build_seconds, image_size=(400, 225))
        figs.update(bench_build(str(small.root), small.version, vae_dir, str(Path(tmp) / "out")))
    f = figs
    summary = "" if a.build_only else (
        f"decode+resize 424x800: {f['decode_fps_per_core']:.0f} fps/core vs {f['baseline_fps_per_core']:.0f} "
        f"baseline ({f['speedup']:.2f}x, PSNR {f['psnr_db_vs_baseline']:.1f} dB); tiny VAE CPU "
        f"{f['tiny_vae_cpu_fps_64x128']:.0f} fps at 64x128; real VAE "
        f"{f['real_vae_mflop_per_pixel_frame']:.2f} MFLOP/pixel-frame; ")
    summary += (f"build {f['build_clips_per_s']:.2f} clips/s = {f['build_vs_serial']:.2f}x serial at "
                f"1 VAE thread (whole commands; {f['build_vs_serial_loop']:.2f}x the warm loop), encode+write stage {f['encode_write_vs_serial']:.2f}x")
    save("encode", figs, summary)


if __name__ == "__main__":
    main()
