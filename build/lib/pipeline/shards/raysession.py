"""The build's Ray session: join a cluster or start a local Ray, and stop the local one fast.

A small local build's overhead was mostly Ray's own start and stop (docs/build.md, "Whole-build
overhead"); the fixes live here, in one place, for the build and the tests' Ray.
"""
from __future__ import annotations

import os
import sys

# A local Ray's raylet connects to its own object store right after starting it, and when the store is not
# up at the first try it waits raylet_client_connect_timeout_milliseconds (default 1000) before the next:
# ray.init took 2.4 s or 3.4 s by that race (its log: 1.000 s between the store's start and the object
# manager's). Ten times the attempts at a tenth of the delay: the same 10 s budget, ray.init 2.4 s.
LOCAL_RAY_CONFIG = {"raylet_client_connect_timeout_milliseconds": 100, "raylet_client_num_connect_attempts": 100}


def init_ray(cpus: int, address: str | None = None):
    """Join the cluster at ``address`` (or $RAY_ADDRESS), else start a local Ray on ``cpus`` CPUs; the ray module."""
    import ray
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False,
                     _system_config=LOCAL_RAY_CONFIG)
    return ray


def ray_running() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def stop_ray() -> None:
    """Stop the Ray this command started (or leave the cluster it joined) now, and fast: a small local build
    spent a third of its overhead here (bench/encode.py build_vs_serial).
    - Not in Ray's exit hook, which first sleeps 0.5 s for worker logs to print; the build forwards none.
    - The autoscaler monitor of a local Ray is killed first: on SIGTERM it reports its own death to the
      GCS, which ray.shutdown() has already stopped, and hangs until shutdown's 1 s grace runs out. It
      holds no state (ray 2.60 has no ray.init switch for it, hence the private lookup, skipped if absent)."""
    import ray
    try:
        node = ray._private.worker._global_node
        for info in (node.all_processes.get("monitor", []) if node is not None and node.is_head() else []):
            info.process.kill()
            info.process.wait(timeout=5)
    except Exception:  # noqa: BLE001  another Ray layout: the plain shutdown still works
        pass
    ray.shutdown()
