"""bench/gpu.py: the CPU answer, the peak table, and every code path on the CPU (--smoke)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.gpu import peak_tflops

REPO = Path(__file__).resolve().parents[1]


def test_peak_tflops_by_device_name():
    assert peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", None) == 756.0
    assert peak_tflops("NVIDIA H200", None) == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", None) == 312.0
    assert peak_tflops("NVIDIA A10", None) == 125.0
    assert peak_tflops("NVIDIA L40S", None) == 362.0
    assert peak_tflops("Some Future GPU", None) is None
    assert peak_tflops("NVIDIA H100 80GB HBM3", 500.0) == 500.0


def test_without_a_gpu_it_says_so_and_exits_0():
    assert not torch.cuda.is_available()  # the CI box; on a GPU machine run the bench itself
    out = REPO / "bench" / "results" / "gpu.json"
    before = out.stat().st_mtime_ns if out.exists() else None
    r = subprocess.run([sys.executable, "bench/gpu.py", "--quick"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "no CUDA GPU" in r.stdout
    assert (out.stat().st_mtime_ns if out.exists() else None) == before   # nothing written


@pytest.mark.slow
def test_smoke_runs_every_measurement_on_cpu():
    r = subprocess.run([sys.executable, "bench/gpu.py", "--smoke", "--quick"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    fig = json.loads((REPO / "bench" / "results" / "gpu_smoke.json").read_text())["figures"]
    keys = ["vae_encode_tiling_off", "vae_encode_tiling_on", "tiny_build", "sharded_tiny_build",
            "tiny_32x64_t9_ckpt_off", "tiny_32x64_t9_ckpt_on", "sharded_tiny_32x64_t9_ckpt_on"]
    for k in keys:
        assert "error" not in fig[k], (k, fig[k])
    assert fig["vae_encode_tiling_off"]["latent_shape"] == [2, 16, 3, 4, 6]   # (V, 16, T', H/8, W/8)
    for k in keys[4:]:
        assert fig[k]["step_s"] > 0 and fig[k]["tflop_per_step"] > 0 and fig[k]["estimated_peak_gb"] > 0
    assert fig["sharded_tiny_32x64_t9_ckpt_on"]["sharded"] is True and fig["tiny_32x64_t9_ckpt_on"]["sharded"] is False
    for k in ("vae_decode_view_tiling_on", "vae_decode_view_tiling_off"):   # (c): one view decoded, tiled and not
        assert "error" not in fig[k] and fig[k]["frames_shape"] == [9, 64, 96, 3], (k, fig[k])
