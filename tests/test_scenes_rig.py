"""Timeline by trigger round on the lidar-triggered synthetic rig with dropped images: every dropped image is
flagged exactly (no false flags after 50 ms steps), and every view's frame is paired with its own round."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.contract import schema
from pipeline.scenes.nuscenes import build_timeline, load_nuscenes
from pipeline.synth.writer import write_dataset
from pipeline.synth.world import CAMERA_RIG


@pytest.fixture(scope="module")
def dropped(tmp_path_factory):
    info = write_dataset(tmp_path_factory.mktemp("rig") / "data", scenes=1, seconds=6.0, image_size=(96, 54),
                         seed=3, drop_rate=0.1)
    nusc = load_nuscenes(str(info.root), info.version)
    truth = pq.read_table(info.truth_path, columns=["channel", "frame_index", "dropped", "sample_data_token",
                                                    "timestamp_us"]).to_pandas().drop_duplicates()
    files = {r["filename"]: r["token"] for r in json.loads((info.root / info.version / "sample_data.json").read_text())}
    return info, build_timeline(nusc, info.scene_names[0]), truth, files


def test_dropped_images_are_flagged_exactly(dropped):
    info, tl, truth, files = dropped
    ref = schema.REFERENCE_VIEW
    round_of = dict(zip(truth.sample_data_token, truth.frame_index))           # image -> its trigger round
    row_of = {round_of[files[p]]: i for i, p in enumerate(tl.frame_paths[:, tl.views.index(ref)])}
    lost = truth[truth.dropped]
    assert set(lost.channel) == set(schema.VIEWS) and len(lost) >= 20        # every camera drops some
    expected = set()
    for ch, r in zip(lost.channel, lost.frame_index):
        if ch == ref:   # the next CAM_FRONT round present carries the gap flag: no clip spans the hole
            expected.add((row_of[min(x for x in row_of if x > r)], ref, "gap"))
        elif r in row_of:
            expected.add((row_of[r], ch, "no_match"))
    flagged = {(p.frame, p.view, p.reason) for p in tl.problems}
    assert flagged == expected
    assert (~tl.frame_ok).sum() == len(expected)
    # the hard case of the old median rule: a CAM_FRONT drop right after a 50 ms step (150 ms hole)
    front = truth[(truth.channel == ref)].sort_values("frame_index")
    step_before = dict(zip(front.frame_index[1:], np.diff(front.timestamp_us)))
    assert any(abs(step_before[r] - 50_000) < 2_000 for r in lost[lost.channel == ref].frame_index)
    steps = np.diff(tl.timestamps_us)
    assert (np.abs(steps - 50_000) < 2_000).sum() > 10                     # many 50 ms steps, none flagged


def test_every_view_is_paired_with_its_own_round(dropped):
    info, tl, truth, files = dropped
    round_of = dict(zip(truth.sample_data_token, truth.frame_index))
    rounds = np.full(tl.frame_ok.shape, -1)
    for (i, j), p in np.ndenumerate(tl.frame_paths):
        if p:
            rounds[i, j] = round_of[files[p]]
    ok = tl.frame_ok
    assert ok.sum() > 0.9 * ok.size
    np.testing.assert_array_equal(np.where(ok, rounds, -1),
                                  np.where(ok, rounds[:, [tl.views.index(schema.REFERENCE_VIEW)]], -1))
    # the offsets the pairing used are the rig's (estimated from the keyframes)
    assert all(abs(tl.rig_offsets_us[j] - CAMERA_RIG[v][5]) <= 600 for j, v in enumerate(tl.views))
    # the view timestamps are the paired frames' own exposures
    exposure = dict(zip(truth.sample_data_token, truth.timestamp_us))
    for (i, j), p in np.ndenumerate(tl.frame_paths):
        if ok[i, j]:
            assert tl.view_timestamps_us[i, j] == exposure[files[p]]
