"""The shard stage: JPEG decode/resize/crop (frames), CogVAE encode actors (vae, encode), sample
assembly from the scene stores (clips), the deterministic shard writer (write) and the build's
typed config (build_config). pipeline/build.py drives it on Ray.
"""
