"""pipeline/shards/windows.py: encode calls whose frame windows never exceed the budget, and cover every view once."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.shards.encode import EncodeUnit
from pipeline.shards.windows import frame_bytes, merge_parts, plan_calls, window_stats

H, W, V = 32, 64, 6
FB = frame_bytes(H, W)  # 6144 B


def _unit(start: int, t: int) -> EncodeUnit:
    frames = [[f"cam{v}/f{start + i:04d}.jpg" for v in range(V)] for i in range(t)]  # T x V
    return EncodeUnit(f"k{start:04d}_t{t}", frames, [f"k{start:04d}_t{t}"])


def _units():
    # overlapping 17-frame units every 8 frames and single frames: neighbours share frames
    return {("s0", H, W): [_unit(s, 17) for s in range(0, 48, 8)] + [_unit(s, 1) for s in range(0, 60, 12)],
            ("s1", H, W): [_unit(s, 9) for s in range(0, 40, 8)]}


def _coverage(calls) -> dict[str, list[int]]:
    seen: dict[str, list[int]] = {}
    for c in calls:
        for u in c.units:
            v0, v1 = c.views or (0, V)
            seen.setdefault(u.uid, []).extend(range(v0, v1))
    return seen


@pytest.mark.parametrize("budget", [17 * FB, 2 * 17 * FB + 1, 17 * V * FB, 40 * V * FB, 10**9])
def test_every_window_fits_the_budget_and_every_view_is_encoded_once(budget):
    units = _units()
    calls = plan_calls(units, budget, units_per_call=4)
    for c in calls:
        assert c.window_bytes() <= budget
        v0, v1 = c.views or (0, V)
        # the window holds exactly the frames of its units' views, nothing else
        assert c.paths == sorted({p for u in c.units for row in u.frames for p in row[v0:v1]})
        assert len(c.units) <= 4 and (c.views is None or len(c.units) == 1)
    assert _coverage(calls) == {u.uid: list(range(V)) for us in units.values() for u in us}
    # units keep their order inside a (scene, resolution): calls are consecutive slices of it
    for g, us in units.items():
        assert [u.uid for c in calls if c.group == g for u in c.units] == \
               [u.uid for u in us for _ in range(sum(1 for c in calls if c.group == g and u in c.units))]


def test_split_only_when_a_unit_does_not_fit_and_sizes_follow():
    calls = plan_calls({("s0", H, W): [_unit(0, 17)]}, 2 * 17 * FB + 1, units_per_call=4)
    assert [c.views for c in calls] == [(0, 2), (2, 4), (4, 6)]
    assert [c.window_bytes() for c in calls] == [2 * 17 * FB] * 3
    whole = plan_calls({("s0", H, W): [_unit(0, 17)]}, 17 * V * FB, units_per_call=4)
    assert [c.views for c in whole] == [None] and whole[0].window_bytes() == 17 * V * FB
    # a large budget packs units_per_call units, sharing their overlapping frames
    st = window_stats(plan_calls(_units(), 10**9, units_per_call=4))
    assert st["peak_window_bytes"] == (8 * 3 + 17) * V * FB  # starts 0, 8, 16, 24: frames 0..40
    assert st["frames_decoded"] >= st["frames_distinct"]


def test_budget_below_one_view_of_a_clip_is_a_clear_error():
    with pytest.raises(ValueError, match=r"below one view of clip k0000_t17.*--frame-budget-mb"):
        plan_calls({("s0", H, W): [_unit(0, 17)]}, 17 * FB - 1, units_per_call=4)


def test_view_parts_join_in_view_order():
    rng = np.random.default_rng(0)
    full = rng.standard_normal((V, 16, 3, 4, 8)).astype(np.float16)
    parts = [{"mean": full[a:b], "std": full[a:b] * 2, "bad_frames": {f"p{a}": "corrupt"} if a == 2 else {},
              "views": (a, b)} for a, b in ((4, 6), (0, 2), (2, 4))]
    m = merge_parts(parts)
    assert np.array_equal(m["mean"], full) and np.array_equal(m["std"], full * 2)
    assert m["bad_frames"] == {"p2": "corrupt"} and m["views"] == (0, V)
    with pytest.raises(ValueError, match="do not tile"):
        merge_parts(parts[:2])
