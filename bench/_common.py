"""Benchmark convention: every bench/<name>.py measures a figure AND its baseline in the
same run, prints one summary line, and writes bench/results/<name>.json via `save()`.
Ratios (figure / baseline) are what we compare across machines; absolute numbers
carry the machine info recorded next to them."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/x.py`


def machine_info() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "processor": platform.processor()}
    try:
        import torch
        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def save(name: str, figures: dict, summary: str) -> Path:
    """Print the one-line summary and write bench/results/<name>.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    record = {"name": name, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine_info(), "figures": figures, "summary": summary}
    out.write_text(json.dumps(record, indent=2, sort_keys=True, default=float) + "\n")
    print(f"[{name}] {summary}  -> {out.relative_to(RESULTS.parent.parent)}")
    return out


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def best(fn, repeats: int = 3) -> tuple[Timer, object]:
    """Min over runs of fn(): the machine is shared, the minimum is the least disturbed (all paths alike)."""
    times, value, t = [], None, None
    for _ in range(repeats):
        with Timer() as t:
            value = fn()
        times.append(t.seconds)
    t.seconds = min(times)
    return t, value


def synthetic_scene(keep: str | None, prefix: str, seed: int):
    """A 20 s synthetic scene (written once, or reused from --keep DIR): (root, NuScenes, scene name, NuScenesMap)."""
    import tempfile
    from pipeline.scenes.nuscenes import load_map, load_nuscenes
    from pipeline.synth.writer import write_dataset
    root = keep or tempfile.mkdtemp(prefix=prefix)
    if not os.path.isdir(os.path.join(root, "v1.0-synth")):
        write_dataset(root, scenes=1, seconds=20.0, image_size=(160, 90), seed=seed)
    nusc = load_nuscenes(root, "v1.0-synth")
    scene = nusc.scene[0]
    return root, nusc, scene["name"], load_map(root, nusc.get("log", scene["log_token"])["location"])
