"""mdv2-plan against the scenes stage's own clip index, with a "full" bucket (one clip per scene, named by its
actual T in the shard path); the e2e build comparison is in tests/test_build_e2e.py."""
from __future__ import annotations

from collections import Counter

from pipeline.scenes.buckets import read_clip_index
from pipeline.shards.plan import PlanConfig, make_plan
from pipeline.scenes.run import ScenesConfig, process_scenes
from pipeline.shards.write import ClipRef, plan_shards

STAGE = """name: plan-test
buckets:
  - {height: 32, width: 64, num_frames: 1, batch_size: 8}
  - {height: 32, width: 64, num_frames: full, batch_size: 1}
  - {height: 64, width: 128, num_frames: 17, batch_size: 2, stride: 8}
"""


def test_plan_counts_equal_the_scenes_stage(synth_dataset, tmp_path):
    stage = tmp_path / "stage.yaml"
    stage.write_text(STAGE)
    root, version = str(synth_dataset.root), synth_dataset.version
    process_scenes(ScenesConfig(dataroot=root, version=version, out=str(tmp_path / "o"), stage=str(stage),
                                progress=False))
    rows = read_clip_index(str(tmp_path / "o")).to_pylist()
    shards = plan_shards([ClipRef(r["key"], r["split"], r["scene_name"], r["start"], r["num_frames"], r["height"],
                                  r["width"]) for r in rows], 3)
    plan = make_plan(PlanConfig(stage=str(stage), dataroot=root, version=version, out=str(tmp_path / "o"),
                                samples_per_shard=3))
    bucket_of = {r["key"]: r["bucket"] for r in rows}
    assert {b: p.clips for b, p in plan.buckets.items()} == dict(Counter(r["bucket"] for r in rows))
    assert {b: p.shards for b, p in plan.buckets.items()} == dict(Counter(bucket_of[s.keys[0]] for s in shards))
    assert plan.buckets["32x64_tfull"].clips == len(synth_dataset.scene_names)
    full = plan.buckets["32x64_tfull"]
    t = max(r["num_frames"] for r in rows if r["bucket"] == "32x64_tfull")
    assert full.pixel_frames == sum(r["num_frames"] for r in rows if r["bucket"] == "32x64_tfull") * 6 * 32 * 64
    assert t == 65 and full.bytes > 0   # 72 frames -> the longest 8k+1 run is 65
