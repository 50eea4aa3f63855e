"""The data conventions of the authors' loader, checked on known geometry: what `model/native.py`
makes from our Conditions must be what their dataloader (MagicDriveDiT: magicdrivedit/datasets/
nuscenes_t_dataset.py, magicdrivedit/mmdet_plugin/..., configs/dataset/Nuscenes*.yaml) hands their
MagicDriveSTDiT3.forward for the same scene. Every expected value is derived by hand from their
convention (cited per test); nothing of their code is imported or copied.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model import native
from model.conditions import random_conditions
from model.embedders import box_corners_authors
from model.registry import build_model
from pipeline.contract import schema
from pipeline.contract.geometry import make_transform, transform_points, yaw_to_quat

torch.set_num_threads(1)

# their configs/dataset/Nuscenes.yaml: map_classes, object_classes, view_order, neighboring_view_pair;
# the stage-3 train config's mv_order_map is the same pair table
THEIR_MAP_CLASSES = ("drivable_area", "ped_crossing", "walkway", "stop_line", "carpark_area", "road_divider",
                     "lane_divider", "road_block")
THEIR_OBJECT_CLASSES = ("car", "truck", "construction_vehicle", "bus", "trailer", "barrier", "motorcycle",
                        "bicycle", "pedestrian", "traffic_cone")
THEIR_VIEW_ORDER = ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_RIGHT", "CAM_BACK", "CAM_BACK_LEFT")
THEIR_MV_ORDER_MAP = {0: [5, 1], 1: [0, 2], 2: [1, 3], 3: [2, 4], 4: [3, 5], 5: [4, 0]}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("tiny").eval()


def _cond(B=1, V=1, T=1, N=1, G=8, seed=0):
    return random_conditions(B, V, T, boxes=N, text_dim=32, bev_size=G, generator=torch.Generator().manual_seed(seed))


def _kw(model, cond, latent_hw=(2, 2), drop_cond=None, drop_frames=None):
    B, V, T = cond.batch_size, cond.num_views, cond.num_frames
    return native.native_inputs(model, cond, (B, V, 16, (T - 1) // 4 + 1, *latent_hw), drop_cond, drop_frames)


# ---- 1. BEV map ---------------------------------------------------------------------------------------

def test_map_and_object_class_tables_are_theirs():
    assert schema.MAP_CLASSES == THEIR_MAP_CLASSES
    assert schema.OBJECT_CLASSES == THEIR_OBJECT_CLASSES


def _rect_in_our_layout(G, x0, x1, y0, y1):
    """(8, G, G) our bev.npy layout (schema.py: row 0 ahead, column 0 left), drivable area (channel 0)
    on the cells whose centres lie in x0 < x < x1, y0 < y < y1 (LiDAR metres)."""
    x, y = schema.bev_cell_centres(G)
    bev = np.zeros((8, G, G), bool)
    bev[0] = (x > x0) & (x < x1) & (y > y0) & (y < y1)
    return torch.from_numpy(bev).float()


@pytest.mark.parametrize("G, cell", [(200, 0.5), (400, 0.25)])
def test_map_layout_is_theirs_on_a_known_rectangle(model, G, cell):
    """Their LoadBEVSegmentation (mmdet_plugin/datasets/pipelines/loading.py, _get_data): the devkit's
    get_map_mask on a 100 m patch at the LiDAR origin with patch_angle = the LiDAR x axis' yaw, so the
    mask's row axis runs along LiDAR y and its column axis along LiDAR x, both from -50 m (cv2 pixel k
    at -50 + r k), then `masks.transpose(0, 2, 1)`: maps[c, i, j] is the cell at x = -50 + r i,
    y = -50 + r j. A drivable area 5..15 m right of the ego and 20..30 m ahead (in our layout: rows
    40..59, columns 110..129 at 0.5 m) must land at i = (5 + 50) / r .. (15 + 50) / r - 1 and
    j = (20 + 50) / r .. (30 + 50) / r - 1 (110..129, 140..159 at 0.5 m; our cell k goes to their index k,
    half a cell off: their pixel centres sit on the corners of our cells)."""
    cond = _cond(G=G).replace(bev=_rect_in_our_layout(G, 5.0, 15.0, 20.0, 30.0)[None, None])
    maps = _kw(model, cond)["maps"]
    assert maps.shape == (1, 1, 8, G, G) and maps.dtype == torch.float32
    i, j = torch.nonzero(maps[0, 0, 0], as_tuple=True)
    n = round(10.0 / cell)                                         # cells per 10 m
    assert (i.min(), i.max()) == (round(55.0 / cell), round(55.0 / cell) + n - 1)   # x 5..15 m: 110..129 at 0.5 m
    assert (j.min(), j.max()) == (round(70.0 / cell), round(70.0 / cell) + n - 1)   # y 20..30 m: 140..159
    assert len(i) == n * n and not maps[0, 0, 1:].any()
    # their index -> metres, by their convention (pixel k at -50 + r k): inside the rectangle to half a cell
    assert 5.0 - cell <= -50 + cell * float(i.min()) and -50 + cell * float(i.max()) <= 15.0
    assert 20.0 - cell <= -50 + cell * float(j.min()) and -50 + cell * float(j.max()) <= 30.0


def _their_map(nmap, lidar2global: np.ndarray, G: int, layers: tuple[str, ...]) -> np.ndarray:
    """Their LoadBEVSegmentation._get_data, restated: patch at the LiDAR origin, patch_angle the yaw
    (degrees) of the LiDAR x axis, the devkit's get_map_mask, transpose(0, 2, 1), their class order."""
    v = lidar2global[:3, :3] @ np.array([1.0, 0.0, 0.0])
    angle = math.degrees(math.atan2(v[1], v[0]))
    box = (lidar2global[0, 3], lidar2global[1, 3], schema.BEV_EXTENT_M, schema.BEV_EXTENT_M)
    masks = nmap.get_map_mask(box, angle, list(layers), (G, G)).transpose(0, 2, 1).astype(bool)
    out = np.zeros((len(THEIR_MAP_CLASSES), G, G), bool)
    for k, name in enumerate(THEIR_MAP_CLASSES):
        if name in layers:
            out[k] = masks[layers.index(name)]
    return out


@pytest.mark.parametrize("G", [200, 400])
def test_map_equals_their_loader_on_the_devkit(model, tmp_path, G):
    """The same synthetic map through the real devkit: their loader's map tensor (restated above)
    vs our rasteriser's bev (pipeline/scenes/bevmap.bev_fast) through native_inputs. Equal but for the
    cells along the edges (their pixel centres sit half a cell off ours: 0.25 / 0.125 m)."""
    from nuscenes.map_expansion.map_api import NuScenesMap

    from pipeline.scenes.bevmap import bev_fast
    from tests.factories_scenes import write_map

    pose = make_transform(yaw_to_quat(np.deg2rad(30.0)), [500.0, 300.0, 1.8])      # LiDAR -> global

    def glob(x0, x1, y0, y1):
        pts = np.array([[x0, y0, 0], [x1, y0, 0], [x1, y1, 0], [x0, y1, 0]], float)
        return transform_points(pose, pts)[:, :2]

    write_map(tmp_path, "boston-seaport", {
        "drivable_area": [glob(5.0, 15.0, 20.0, 30.0)],        # right, ahead
        "walkway": [glob(-30.0, -10.0, -40.0, -35.0)],        # left, behind
        "carpark_area": [glob(20.0, 40.0, -20.0, -5.0)]},     # right, behind
        {"lane_divider": [glob(-20.0, -20.0, -40.0, 40.0)[1:3]]})   # x = -20 m, y -40..40 m
    nmap = NuScenesMap(dataroot=str(tmp_path), map_name="boston-seaport")
    layers = ("drivable_area", "walkway", "carpark_area", "lane_divider")
    theirs = _their_map(nmap, pose, G, layers)
    ours = bev_fast(nmap, pose[None], cells=G)[0]                                   # (8, G, G) our layout
    maps = _kw(model, _cond(G=G).replace(bev=torch.from_numpy(ours).float()[None, None]))["maps"][0, 0]
    got = maps.numpy() > 0.5
    for name in layers[:3]:
        c = THEIR_MAP_CLASSES.index(name)
        a, b = got[c], theirs[c]
        assert b.sum() > 100
        iou = (a & b).sum() / (a | b).sum()
        assert iou > 0.9, (name, iou)
        # what differs is within one cell of their mask's edge
        edge = b ^ np.roll(b, 1, 0) | b ^ np.roll(b, -1, 0) | b ^ np.roll(b, 1, 1) | b ^ np.roll(b, -1, 1)
        assert not ((a ^ b) & ~edge).any(), name
        # our stored layout itself is not theirs: without the conversion the rectangle is elsewhere
        assert (ours[c] & b).sum() < 0.1 * b.sum()
    # a line (their devkit call: 2 px wide, vertices truncated) lands on the same cells to one cell
    # (here, on a pixel boundary, the worst case: one cell towards -x, IoU ~0.5)
    c = THEIR_MAP_CLASSES.index("lane_divider")
    a, b = got[c], theirs[c]

    def grow(m):                                                  # by one cell, diagonals too
        return np.any([np.roll(m, (di, dj), (0, 1)) for di in (-1, 0, 1) for dj in (-1, 0, 1)], 0)
    mid = slice(G // 4, 3 * G // 4)                                 # away from the line's ends (caps differ)
    assert b.sum() > 100 and abs(int(a.sum()) - int(b.sum())) < 0.05 * b.sum()
    assert not (a & ~grow(b))[:, mid].any() and not (b & ~grow(a))[:, mid].any()
    lo = round(30.0 * G / schema.BEV_EXTENT_M)                    # x = -20 m: their index (x + 50) / r
    assert set(np.nonzero(b.any(1))[0]) <= {lo - 1, lo, lo + 1}
    assert set(np.nonzero(a.any(1))[0]) <= {lo - 2, lo - 1, lo, lo + 1}
    assert (ours[c] & b).sum() < 0.1 * b.sum()
    assert not got[[THEIR_MAP_CLASSES.index(n) for n in THEIR_MAP_CLASSES if n not in layers]].any()


# ---- 2. boxes -----------------------------------------------------------------------------------------

def _their_corners(box: np.ndarray) -> np.ndarray:
    """Their box in LiDAR (tools/prepare_data/data_converter/nuscenes_converter.py,
    _sample_data_transform: [centre, wlh, -yaw - pi/2]; NuScenesDataset.get_ann_info reads it with
    origin (0.5, 0.5, 0), so the stored
    nuScenes centre is taken as the bottom centre) and LiDARInstance3DBoxes.corners (mmdet_plugin/core/
    bbox/structures/lidar_box3d.py): unit corners in unravel order re-indexed [0, 1, 3, 2, 4, 5, 7, 6],
    minus (0.5, 0.5, 0), times (dx, dy, dz), rotated by rotation_3d_in_axis(axis=2) (points @ [[c, -s, 0],
    [s, c, 0], [0, 0, 1]]), plus the box tensor's xyz. Restated here from the description."""
    x, y, z, w, l, h, yaw = box
    theta = -yaw - math.pi / 2
    unit = np.array([[(k >> 2) & 1, (k >> 1) & 1, k & 1] for k in range(8)], float)[[0, 1, 3, 2, 4, 5, 7, 6]]
    local = (unit - [0.5, 0.5, 0.0]) * [w, l, h]
    c, s = math.cos(theta), math.sin(theta)
    rot_t = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return local @ rot_t + [x, y, z]


def test_box_corners_are_theirs_on_a_known_box():
    """(10, 5, -1), w 2, l 4, h 1.5, yaw 0.3 (our convention: centre, heading from +x). By hand:
    heading (cos .3, sin .3), right of it (sin .3, -cos .3); their corner a b c = (a - 1/2) w to the
    left, (b - 1/2) l to the back, c h up from z (their lift: z is read as the bottom)."""
    box = np.array([10.0, 5.0, -1.0, 2.0, 4.0, 1.5, 0.3])
    fr, fl = (12.2061932, 4.6357039), (11.6151528, 6.5463769)   # front-right (a 0, b 0), front-left (a 1, b 0)
    br, bl = (8.3848472, 3.4536231), (7.7938068, 5.3642961)      # back-right (a 0, b 1), back-left (a 1, b 1)
    expected = np.array([[*fr, -1.0], [*fr, 0.5], [*br, 0.5], [*br, -1.0],
                         [*fl, -1.0], [*fl, 0.5], [*bl, 0.5], [*bl, -1.0]])
    np.testing.assert_allclose(_their_corners(box), expected, atol=1e-6)
    ours = box_corners_authors(torch.tensor(box)[None]).numpy()[0]
    np.testing.assert_allclose(ours, expected, atol=1e-6)
    true = box_corners_authors(torch.tensor(box)[None], lifted=False).numpy()[0]
    np.testing.assert_allclose(true, expected - [0, 0, 0.75], atol=1e-6)            # the real box: z -1.75..-0.25
    rng = np.random.default_rng(1)
    for _ in range(20):
        b = np.r_[rng.uniform(-40, 40, 3), rng.uniform(0.3, 6, 3), rng.uniform(-math.pi, math.pi)]
        np.testing.assert_allclose(box_corners_authors(torch.tensor(b)[None]).numpy()[0], _their_corners(b),
                                   atol=1e-9)


def test_box_masks_classes_and_padding_are_theirs(model):
    """Their _preprocess_bbox_keep_all (nuscenes_t_dataset.py, bbox_processor_type 2 of the stage-3
    config) + pad_bboxes_to_maxlen (utils/misc.py): the boxes of a sample are the union of its frames'
    boxes (tracks never present in the clip do not exist), padded with zeros / class -1 / mask 0 to the
    batch's most; in a frame where a box is absent: corners 0, class -1, mask 0; mask 1 where any corner of
    the real box (trans_boxes_to_view re-centres to (0.5, 0.5, 0.5): the unlifted corners) has camera
    z > 0 (ensure_positive_z with that frame's lidar2camera)."""
    B, T, V, N = 2, 5, 1, 4
    cond = _cond(B=B, V=V, T=T, N=N)
    boxes = torch.zeros(B, T, N, 7)
    boxes[..., 3:6] = 1.0
    boxes[..., 2] = 0.5                                     # above the camera: seen
    boxes[0, :, 2, 2] = -0.5
    boxes[0, :, 2, 5] = 0.8                                 # real box z -0.9..-0.1 (lifted: -0.5..0.3): unseen
    present = torch.zeros(B, T, N, dtype=torch.bool)
    present[0, :, 0] = True
    present[0, 1:3, 2] = True                               # track 2 in frames 1, 2 only
    present[1, 3, 3] = True                                 # sample 1: only track 3, in frame 3
    c2l = torch.eye(4).expand(B, T, V, 4, 4).clone()        # a camera at the origin looking up (+z)
    cls = torch.tensor([[3, 7, 5, 1], [2, 2, 9, 6]])
    lat = torch.arange(B * N * 32, dtype=torch.float32).view(B, N, 32)
    cond = cond.replace(boxes=boxes, view_boxes=boxes[:, :, None].clone(), box_mask=present, box_class=cls,
                        box_view_mask=present[:, :, None].clone(), cam2lidar=c2l, box_latent=lat)
    bbox = _kw(model, cond)["bbox"]
    M = 2                                                   # sample 0: tracks 0 and 2; sample 1: track 3 + a pad
    assert bbox["bboxes"].shape == (B * V, T, M, 8, 3) and bbox["masks"].shape == (B * V, T, M)
    masks, classes = bbox["masks"], bbox["classes"]
    assert masks.dtype == torch.int32 and classes.dtype == torch.int32
    assert masks[0, :, 0].tolist() == [1] * 5               # track 0: z 0..1, in front of the camera
    assert masks[0, :, 1].tolist() == [0] * 5               # track 2: real corners all below the camera
    assert classes[0, :, 0].tolist() == [3] * 5
    assert classes[0, :, 1].tolist() == [-1, 5, 5, -1, -1]
    assert masks[1, :, 0].tolist() == [0, 0, 0, 1, 0] and classes[1, :, 0].tolist() == [-1, -1, -1, 6, -1]
    assert masks[1, :, 1].tolist() == [0] * 5 and classes[1, :, 1].tolist() == [-1] * 5     # padding
    assert not bbox["bboxes"][0, [0, 3, 4], 1].any() and not bbox["bboxes"][1, :, 1].any()
    assert not bbox["bboxes"][1, [0, 1, 2, 4], 0].any()
    torch.testing.assert_close(bbox["bboxes"][0, 1, 1], box_corners_authors(boxes[0, 1, 2][None])[0])
    # the per-box latent follows its box (one draw per box, shared by frames and views)
    assert torch.equal(bbox["box_latent"][0, :, 1], lat[0, 2].expand(T, 32))
    assert torch.equal(bbox["box_latent"][1, :, 0], lat[1, 3].expand(T, 32))


# ---- 3. cameras, 4. ego poses -------------------------------------------------------------------------

def test_cams_are_original_K_and_camera_to_lidar_of_each_frame(model):
    """Their collate_fn_single_clip: camera_param = [camera_intrinsics 3x3 | camera2lidar[:3]] per frame.
    camera_intrinsics is the info's K of the original 1600 x 900 image (ImageAug3D only writes
    img_aug_matrix); camera2lidar is sensor2lidar of that frame (camera -> LiDAR(t)), not lidar2camera."""
    cond = _cond(V=1, T=5)
    K_src = torch.tensor([[[1266.4, 0.0, 816.3], [0.0, 1266.4, 491.5], [0.0, 0.0, 1.0]]])
    K_stored = K_src.clone()
    K_stored[:, :2] *= 0.25                                 # a 224 x 400 bucket's K: must not be used
    c2l = torch.eye(4).expand(1, 5, 1, 4, 4).clone()
    c2l[..., :3, :3] = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])  # z ahead, y down
    c2l[..., :3, 3] = torch.tensor([0.0, 1.0, 1.5])
    c2l[0, 3, 0, 1, 3] = 4.0                                # frame 3: the camera 3 m further ahead
    cams = _kw(model, cond.replace(intrinsics=K_stored[None], source_intrinsics=K_src[None], cam2lidar=c2l))["cams"]
    assert cams.shape == (1, 5, 1, 3, 7)
    torch.testing.assert_close(cams[0, :, 0, :, :3], K_src.expand(5, 3, 3))
    p = torch.tensor([0.0, 0.0, 10.0])                      # 10 m along the optical axis
    lidar = cams[0, :, 0, :, 3:6] @ p + cams[0, :, 0, :, 6]
    torch.testing.assert_close(lidar[0], torch.tensor([0.0, 11.0, 1.5]))
    torch.testing.assert_close(lidar[3], torch.tensor([0.0, 14.0, 1.5]))


def test_rel_pos_is_their_next2top(model):
    """Their obtain_next2top(first, current, v2=True) (nuscenes_t_dataset.py): the LiDAR(t) -> LiDAR(0)
    transform inverted ("point trans from lidar to next"): LiDAR(0) -> LiDAR(t), entries below 1e-6 set
    to 0. Known pose: at frame 1 the ego is 5 m ahead (+y) and turned 10 deg left; a point 15 m ahead of
    LiDAR(0) is then 10 m away at 10 deg to the right: (10 sin 10, 10 cos 10, 0) in LiDAR(1)."""
    cond = _cond(T=5)
    a = math.radians(10.0)
    traj = torch.eye(4).expand(1, 5, 4, 4).clone()          # our traj: LiDAR(t) -> LiDAR(0)
    traj[0, 1, :2, :2] = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    traj[0, 1, 1, 3] = 5.0
    e = 1e-8                                                # frame 2: a rotation below their epsilon
    traj[0, 2, 1:3, 1:3] = torch.tensor([[math.cos(e), -math.sin(e)], [math.sin(e), math.cos(e)]])
    rel = _kw(model, cond.replace(traj=traj))["rel_pos"]
    assert rel.shape == (1, 5, 1, 4, 4)
    q = rel[0, 1, 0] @ torch.tensor([0.0, 15.0, 0.0, 1.0])
    torch.testing.assert_close(q, torch.tensor([10 * math.sin(a), 10 * math.cos(a), 0.0, 1.0]))
    assert torch.equal(rel[0, 2, 0], torch.eye(4)) and torch.equal(rel[0, 0, 0], torch.eye(4))


# ---- 5. fps, size, drops, view ring; 6. text ----------------------------------------------------------

def test_fps_size_drops_and_view_ring_are_theirs(model):
    """fps: NuScenesTDataset.prepare_train_data, 12 for a video, IMG_FPS 120 for one frame; height / width:
    the generated images' pixels (pixel_values.shape[-2:]); drops (train_magicdrive.py): a dropped sample
    has drop_cond_mask 0 and drop_frame_mask 0 on every frame, 1 = keep; mv_order_map of their view order."""
    assert schema.VIEWS == THEIR_VIEW_ORDER
    cond = _cond(B=2, V=6, T=9)
    frames = torch.zeros(2, 9, dtype=torch.bool)
    frames[1, 4] = True
    kw = _kw(model, cond, latent_hw=(53, 100), drop_cond=torch.tensor([True, False]), drop_frames=frames)
    assert kw["fps"].tolist() == [12.0, 12.0]
    assert kw["height"].tolist() == [424.0, 424.0] and kw["width"].tolist() == [800.0, 800.0]
    assert kw["drop_cond_mask"].tolist() == [0.0, 1.0]
    assert kw["drop_frame_mask"][0].tolist() == [0.0] * 9
    assert kw["drop_frame_mask"][1].tolist() == [1.0] * 4 + [0.0] + [1.0] * 4
    assert kw["mv_order_map"] == THEIR_MV_ORDER_MAP
    assert _kw(model, _cond(V=6, T=1))["fps"].tolist() == [120.0]


def test_text_is_their_t5_states_and_mask(model):
    """Their T5Embedder.get_text_embeddings: max_length 300 (stage-3 config), padding to max_length,
    truncation, the attention mask; encode -> y (B, 1, L, 4096), mask (B, L); the network reads the
    longest caption + 1 states. native_inputs passes our cache's states and mask through unchanged."""
    from model import text
    assert text.DEFAULT_MAX_LENGTH == 300
    cond = _cond(B=2)
    kw = _kw(model, cond)
    assert kw["y"].shape == (2, 1, *cond.text.shape[1:]) and torch.equal(kw["y"][:, 0], cond.text)
    assert torch.equal(kw["mask"], cond.text_mask)
