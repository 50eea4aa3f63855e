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
