"""Shared fixtures. Area-specific fixtures live in the area's own test modules or in
tests/factories_<area>.py; only fixtures used by several areas belong here."""
from __future__ import annotations

import os
import tempfile

import pytest

# One intra-op thread per process, set before anything imports torch: the suite runs Ray workers, torchrun
# ranks and DataLoader workers beside the test process on 2 cores, and torch's default (a thread per core in
# every process) oversubscribes them. Measured on a 2-core box: the whole suite 20 min -> under 12 min.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Hugging Face datasets (the reader tests) load local folders only: never the hub, and a cache of the session's own
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf-home-"))


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray runtime (num_cpus=2) for the whole session."""
    import ray
    from pipeline.shards.raysession import LOCAL_RAY_CONFIG
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, ignore_reinit_error=True, _system_config=LOCAL_RAY_CONFIG)
    yield ray
    ray.shutdown()


# The standard synthetic dataset of the test suite: 2 scenes x 6 s at 400x225 (72 camera frames each) on
# the lidar-triggered rig, without dropped images (so that every clip is usable); tests of dropped frames
# write their own dataset.
SYNTH_TEST = dict(scenes=2, seconds=6.0, image_size=(400, 225), seed=0, drop_rate=0.0)


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory):
    """A synthetic dataset in the nuScenes v1.0 format, shared read-only by the session.

    Tests that damage files (missing sweep, corrupt JPEG) must write their own copy."""
    from pipeline.synth.writer import write_dataset
    return write_dataset(tmp_path_factory.mktemp("nuscenes"), **SYNTH_TEST)
