"""pipeline/shards/vae.py + pipeline/shards/encode.py on the tiny random CogVAE (real diffusers class, CPU fp32)."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.contract import schema
from pipeline.shards.encode import EncodeConfig, EncodeUnit, VaeEncoder, encode_units, non_finite, vae_meta
from pipeline.shards.frames import FrameSet
from pipeline.shards.vae import TINY_VAE_CONFIG, main as tiny_vae_main


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vae") / "tiny-cogvae"
    assert tiny_vae_main(["--out", str(d)]) == 0
    return str(d)


@pytest.fixture(scope="module")
def encoder(vae_dir):
    return VaeEncoder(EncodeConfig(vae=vae_dir, device="cpu"))


def test_tiny_vae_folder_loads_locally(vae_dir):
    from diffusers import AutoencoderKLCogVideoX
    vae = AutoencoderKLCogVideoX.from_pretrained(vae_dir, local_files_only=True)
    assert list(vae.config.block_out_channels) == list(TINY_VAE_CONFIG["block_out_channels"])
    meta = vae_meta(vae_dir)
    assert meta["scaling_factor"] == pytest.approx(vae.config.scaling_factor)
    assert meta["temporal_compression"] == 4 and meta["spatial_compression"] == 8


def _frames(v, t, h=32, w=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (v, t, h, w, 3), dtype=np.uint8)  # (V, T, H, W, 3)


def test_latent_shapes_and_dtypes(encoder):
    for t in (1, 9, 17):
        mean, std = encoder.encode(_frames(2, t))
        assert mean.shape == std.shape == (2, schema.LATENT_CHANNELS, schema.latent_frames(t), 4, 8)
        assert mean.dtype == std.dtype == np.float16 and non_finite(mean) == 0 and (std > 0).all()
    with pytest.raises(ValueError, match="8k\\+1"):
        encoder.encode(_frames(1, 5))


def test_latent_reuse_holds_for_video_prefixes_not_for_single_frames(encoder):
    """The fact the build relies on: a T>=9 clip's latents are exactly the prefix of a longer clip's."""
    x = _frames(2, 33, seed=1)
    m = {t: encoder.encode(x[:, :t])[0] for t in (1, 9, 17, 33)}
    assert np.array_equal(m[9], m[17][:, :, :3]) and np.array_equal(m[17], m[33][:, :, :5])
    assert np.array_equal(m[9], m[33][:, :, :3])
    assert not np.allclose(m[1], m[9][:, :, :1], atol=1e-2)  # GroupNorm sees the whole first chunk


def test_views_one_at_a_time_give_the_same_latents(vae_dir, encoder):
    x = _frames(3, 9, seed=2)
    one = VaeEncoder(EncodeConfig(vae=vae_dir, device="cpu", views_per_batch=1))
    assert np.array_equal(encoder.encode(x)[0], one.encode(x)[0])


def test_encode_units_reports_bad_frames_and_injected_nan(vae_dir):
    enc = VaeEncoder(EncodeConfig(vae=vae_dir, device="cpu", inject_nan_keys=("k-nan",)))
    paths = [f"f{i}_{v}.jpg" for i in range(9) for v in range(2)]
    fs = FrameSet(32, 64, sorted(paths), _frames(1, len(paths))[0], {"f8_1.jpg": "corrupt"})
    rows = [[f"f{i}_{v}.jpg" for v in range(2)] for i in range(9)]
    out = encode_units(enc, fs, [EncodeUnit("k-ok", rows, ["k-ok"]), EncodeUnit("k-nan", rows[:1], ["k-nan"])])
    assert out["k-ok"]["bad_frames"] == {"f8_1.jpg": "corrupt"} and non_finite(out["k-ok"]["mean"]) == 0
    assert out["k-nan"]["mean"].shape == (2, 16, 1, 4, 8) and non_finite(out["k-nan"]["mean"]) > 0


def test_actors_of_an_earlier_build_do_not_starve_the_next_one(ray_local, vae_dir, tmp_path):
    """Builds in one driver keep their VAE actors for the next build of the same VAE; an actor of another VAE
    (or beyond the build's count) still holds its CPU, and three such held 3 of a 2-CPU Ray's CPUs: every
    later build waited forever for a CPU for its scene tasks (the CI run that never finished)."""
    import time
    from dataclasses import replace
    from pipeline.shards.actorpool import actor_pool, kept_actors, release_actors
    from pipeline.shards.build_config import BuildConfig
    ray = ray_local
    other = tmp_path / "other-vae"
    assert tiny_vae_main(["--out", str(other), "--seed", "1"]) == 0
    def free_cpus(want: float) -> float:  # ray.kill is asynchronous: a killed actor's CPU comes back shortly
        deadline = time.time() + 60
        while ray.available_resources().get("CPU", 0) < want and time.time() < deadline:
            time.sleep(0.2)
        return ray.available_resources().get("CPU", 0)

    release_actors(ray)  # a clean start: the actors earlier builds of this session left
    idle = free_cpus(2.0)
    base = BuildConfig(stage="demo", dataroot="", version="v1.0-synth", out=str(tmp_path / "out"), vae=vae_dir,
                       encode_cpus=0.5,
                       encode=EncodeConfig(vae=vae_dir, device="cpu"))
    first = actor_pool(ray, replace(base, encode_actors=2), None)
    second = actor_pool(ray, replace(base, encode=EncodeConfig(vae=str(other), device="cpu")), None)
    again = actor_pool(ray, replace(base, encode=EncodeConfig(vae=str(other), device="cpu")), None)
    assert len(first) == 2 and len(second) == 1 and again == second  # same VAE: the actor is reused
    assert kept_actors() == 1
    ray.get([a.__ray_ready__.remote() for a in second])  # placed: it holds its 0.5 CPU
    assert free_cpus(idle - 0.5) == pytest.approx(idle - 0.5)  # ...and the killed ones hold nothing
    release_actors(ray)  # leave the session's Ray as it was for the tests after this one
