"""Pixel-level check: a truth box projected through the tables' calibration (read by the devkit)
lands on pixels of its class colour in the written JPEG."""
from __future__ import annotations

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from nuscenes.utils.data_classes import Box
from nuscenes.utils.geometry_utils import view_points
from pyquaternion import Quaternion

from pipeline.contract import schema
from pipeline.synth.render import CLASS_COLORS, MAP_COLORS, OTHER_COLOR, SKY_HORIZON, SKY_TOP, shade_variants


@pytest.fixture(scope="module")
def nusc(synth_dataset):
    from nuscenes.nuscenes import NuScenes
    return NuScenes(version=synth_dataset.version, dataroot=str(synth_dataset.root), verbose=False)


def _palette():
    """(K, 3) RGB colours and (K,) labels: every class's shades, unmapped, map and sky colours."""
    cols, labels = [], []
    for name, rgb in list(CLASS_COLORS.items()) + [("other", OTHER_COLOR)]:
        v = shade_variants(rgb)
        cols.append(v)
        labels += [name] * len(v)
    for name, rgb in list(MAP_COLORS.items()) + [("sky", SKY_TOP), ("sky", SKY_HORIZON)]:
        cols.append(np.asarray([rgb], np.float64))
        labels.append(name)
    return np.concatenate(cols), np.asarray(labels)


def _to_camera(nusc, sd, row) -> Box:
    """Truth box (global) -> camera frame, exactly as NuScenes.get_sample_data does it."""
    box = Box([row.x, row.y, row.z], [row.w, row.l, row.h], Quaternion(axis=[0, 0, 1], angle=row.yaw))
    ep = nusc.get("ego_pose", sd["ego_pose_token"])
    cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
    box.translate(-np.array(ep["translation"]))
    box.rotate(Quaternion(ep["rotation"]).inverse)
    box.translate(-np.array(cs["translation"]))
    box.rotate(Quaternion(cs["rotation"]).inverse)
    return box


def test_truth_boxes_land_on_their_class_colour(synth_dataset, nusc):
    truth = pq.read_table(synth_dataset.truth_path).to_pandas()
    colours, labels = _palette()
    checked = []
    truth = truth[truth.present]
    for ch in ("CAM_FRONT", "CAM_BACK", "CAM_FRONT_LEFT"):
        for sample in nusc.sample[::2]:
            sd = nusc.get("sample_data", sample["data"][ch])
            k = np.array(nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])["camera_intrinsic"])
            rows = truth[truth.sample_data_token == sd["token"]]
            boxes = [(r, _to_camera(nusc, sd, r)) for r in rows.itertuples()]
            boxes.sort(key=lambda rb: np.linalg.norm(rb[1].center))   # the renderer's painter's order
            img = cv2.imread(str(synth_dataset.root / sd["filename"]))[:, :, ::-1].astype(np.float64)
            h, w = img.shape[:2]
            for r, box in boxes[:1]:  # the nearest object is drawn last: nothing covers it
                corners = box.corners()                                # (3, 8)
                if (corners[2] < 0.5).any() or r.class_name is None:
                    continue
                uv = view_points(corners, k, normalize=True)[:2].T       # (8, 2)
                mask = np.zeros((h, w), np.uint8)
                cv2.fillConvexPoly(mask, cv2.convexHull(np.round(uv).astype(np.int32)), 1)
                mask = cv2.erode(mask, np.ones((5, 5), np.uint8))
                if mask.sum() < 40:
                    continue
                pix = img[mask.astype(bool)]                             # (P, 3)
                pix = pix[:: max(1, len(pix) // 1000)]
                nearest = labels[np.argmin(((pix[:, None] - colours[None]) ** 2).sum(-1), 1)]
                checked.append((r.class_name, float(np.mean(nearest == r.class_name))))
    assert len(checked) >= 5, checked
    fractions = np.array([f for _, f in checked])
    assert fractions.min() > 0.85 and np.median(fractions) > 0.95, checked
    assert len({c for c, _ in checked}) >= 2


def test_moved_box_does_not_match(synth_dataset, nusc):
    """The check above can fail: the same box lifted by three times its height misses its colour."""
    truth = pq.read_table(synth_dataset.truth_path).to_pandas()
    colours, labels = _palette()
    misses = total = 0
    for sample in nusc.sample:
        sd = nusc.get("sample_data", sample["data"]["CAM_FRONT"])
        k = np.array(nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])["camera_intrinsic"])
        rows = truth[(truth.sample_data_token == sd["token"]) & truth.present & truth.class_name.isin(["car"])]
        img = cv2.imread(str(synth_dataset.root / sd["filename"]))[:, :, ::-1].astype(np.float64)
        for r in rows.itertuples():
            box = _to_camera(nusc, sd, r)
            if box.center[2] < 5 or box.center[2] > 25:
                continue
            box.translate(np.array([0.0, -3.0 * r.h, 0.0]))   # camera y points down
            c = view_points(box.center[:, None], k, normalize=True)[:2, 0]
            u, v = int(round(c[0])), int(round(c[1]))
            if not (0 <= u < img.shape[1] and 0 <= v < img.shape[0]):
                continue
            nearest = labels[np.argmin(((img[v, u][None] - colours) ** 2).sum(-1))]
            misses += nearest != "car"
            total += 1
    assert total >= 4 and misses >= 0.9 * total, (misses, total)
    assert set(schema.OBJECT_CLASSES) == set(CLASS_COLORS)
