"""Shard planning and encode-unit grouping (pure functions, no Ray): decided before any encoding."""
from __future__ import annotations

import random

from pipeline.contract import schema
from pipeline.shards.encode import plan_units
from pipeline.shards.write import ClipRef, plan_shards


def _clips():
    out = []
    for scene, split in (("sc-a", "train"), ("sc-b", "val"), ("sc-c", "train")):
        for t, starts in ((1, (0, 6, 12, 30)), (9, (0, 8, 16, 24)), (17, (0, 16))):
            for s in starts:
                out.append(ClipRef(schema.sample_key(scene, s, t, 32, 64), split, scene, s, t, 32, 64))
    return out


def test_plan_is_independent_of_input_order_and_fills_shards_in_key_order():
    clips = _clips()
    a = plan_shards(clips, 3)
    shuffled = clips[:]
    random.Random(1).shuffle(shuffled)
    b = plan_shards(shuffled, 3)
    assert [(p.path, p.keys) for p in a] == [(p.path, p.keys) for p in b]
    train_t1 = [p for p in a if p.split == "train" and p.num_frames == 1]
    assert [p.path for p in train_t1] == [f"train/32x64_t1/shard-{i:06d}.tar" for i in range(3)]
    keys = [k for p in train_t1 for k in p.keys]
    assert keys == sorted(keys) and [len(p.keys) for p in train_t1] == [3, 3, 2]
    assert sum(len(p.keys) for p in a) == len(clips)


def test_video_clips_sharing_a_start_share_one_unit_single_frames_do_not():
    clips = _clips()
    frames_of = {c.key: [[f"{c.scene_name}/{c.start + i}/v{v}" for v in range(2)] for i in range(c.num_frames)]
                 for c in clips}
    units, unit_of = plan_units(clips, frames_of)
    assert len(unit_of) == len(clips)
    a = {u.uid: u for u in units[("sc-a", 32, 64)]}
    # start 0: T=17 serves T=9 too; T=1 at start 0 is separate (GroupNorm spans the first chunk)
    k17, k9, k1 = (schema.sample_key("sc-a", 0, t, 32, 64) for t in (17, 9, 1))
    assert unit_of[k9] == unit_of[k17] == k17 and unit_of[k1] == k1
    assert len(a[k17].frames) == 17 and sorted(a[k17].keys) == sorted([k17, k9])
    # start 8: only a 9-frame clip
    k = schema.sample_key("sc-a", 8, 9, 32, 64)
    assert unit_of[k] == k and len(a[k].frames) == 9
    n_units = sum(len(u) for u in units.values())
    assert n_units == len(clips) - 2 * 3  # the two 17-frame starts absorb a 9-frame clip, in 3 scenes


def test_without_reuse_every_clip_is_its_own_unit():
    from pipeline.shards.encode import reuse_holds
    clips = _clips()
    frames_of = {c.key: [["x"]] * c.num_frames for c in clips}
    units, unit_of = plan_units(clips, frames_of, reuse=False)
    assert all(unit_of[c.key] == c.key for c in clips) and sum(len(u) for u in units.values()) == len(clips)
    assert reuse_holds(8) and reuse_holds(4) and not reuse_holds(16) and not reuse_holds(6)
