"""The build's CogVAE encode actors, kept for later builds in the same driver (notebooks, tests): the
model loads once per actor, in its __init__ (pipeline/shards/encode.py: EncodeActor)."""
from __future__ import annotations

from dataclasses import replace

from pipeline.shards.build_config import BuildConfig
from pipeline.shards.buildinputs import vae_digest

_ACTORS: dict = {}  # (encode config, VAE digest, resources, job) -> actor handles


def actor_pool(ray, cfg: BuildConfig, gpu_resources: dict | None) -> list:
    """cfg.encode_actors actors for this build: on a GPU node `gpu_resources` (pipeline/build.py RESOURCES),
    else cfg.encode_cpus CPUs each."""
    from pipeline.shards.encode import EncodeActor
    opts = dict(gpu_resources) if gpu_resources else {"num_cpus": cfg.encode_cpus}
    # encode calls are pure functions of their inputs: a killed actor is restarted (model reloaded in
    # __init__) and its in-flight calls are retried, so a lost GPU node costs time, not samples
    opts.update(max_restarts=-1, max_task_retries=-1)
    threads = cfg.encode.torch_threads if gpu_resources else max(1, int(cfg.encode_cpus))
    enc = replace(cfg.encode, torch_threads=threads, inject_nan_keys=())  # injection travels with the units
    key = (repr(enc), vae_digest(enc.vae), repr(sorted(opts.items())), ray.get_runtime_context().get_job_id())
    # An idle actor still holds its CPUs (or GPU): actors of another VAE/config, or beyond this build's count,
    # would starve this build's scene and frame tasks on a small cluster (2 CPUs: a deadlock), so they go.
    for other in [k for k in _ACTORS if k != key]:
        _kill(ray, _ACTORS.pop(other))
    pool = _ACTORS.setdefault(key, [])
    _kill(ray, pool[cfg.encode_actors:])
    del pool[cfg.encode_actors:]
    while len(pool) < cfg.encode_actors:
        pool.append(ray.remote(**opts)(EncodeActor).remote(enc))
    return pool


def forget_actors() -> None:
    """After the Ray that ran them stopped: their handles are dead."""
    _ACTORS.clear()


def release_actors(ray) -> None:
    """Kill every kept actor (their CPUs or GPUs come back shortly: ray.kill is asynchronous)."""
    for pool in _ACTORS.values():
        _kill(ray, pool)
    _ACTORS.clear()


def kept_actors() -> int:
    return sum(len(p) for p in _ACTORS.values())


def _kill(ray, actors: list) -> None:
    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except Exception:  # noqa: BLE001 - an actor of a Ray that has since shut down is already gone
            pass
