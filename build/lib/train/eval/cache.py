"""Cache of the real clips' features, so a second evaluation against the same real set costs no network pass.

One ``.npy`` per (real clip, view), named by the sha256 of everything its features depend on: the
metric, the protocol, the weights file's sha256, the dataroot, the clip's geometry and decoding,
and the scored source images (paths, sizes and modification times, so a replaced image is
recomputed). Generated features are never cached (a new checkpoint means new frames). Entries are
written to a temporary name and renamed, so an interrupted run leaves no half file. The cache is
keyed per clip rather than per set so that a clip list that grows by one clip costs one clip.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

DEFAULT_DIR_ENV = "MDV2_EVAL_CACHE"


def default_dir() -> str:
    base = os.environ.get(DEFAULT_DIR_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "mdv2-eval")
    return base


def entry_key(context: dict, dataroot: str, paths: list[str]) -> str:
    """sha256 of the context (metric, protocol, weights, geometry) and the scored source images."""
    stats = []
    for rel in paths:
        st = os.stat(os.path.join(dataroot, rel))
        stats.append([rel, st.st_size, st.st_mtime_ns])
    blob = json.dumps({"context": context, "dataroot": os.path.realpath(dataroot), "images": stats},
                      sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


class FeatureCache:
    def __init__(self, root: str | None, metric: str):
        self.dir = os.path.join(root, metric) if root else None
        self.hits = self.misses = 0

    def _path(self, key: str) -> str:
        return os.path.join(self.dir, key[:2], key + ".npy")

    def get(self, key: str) -> np.ndarray | None:
        if self.dir is None:
            return None
        path = self._path(key)
        try:
            arr = np.load(path, allow_pickle=False)
        except (FileNotFoundError, ValueError, OSError):
            self.misses += 1
            return None
        self.hits += 1
        return arr

    def put(self, key: str, features: np.ndarray) -> None:
        if self.dir is None:
            return
        path = self._path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(features, np.float64), allow_pickle=False)
        os.replace(tmp, path)
