"""This project's Conditions -> the keyword arguments of the authors' MagicDriveSTDiT3.forward.

The one conversion between the loader's batch and the network: MVDiT.forward (training and
sampling from our shards) calls `native_inputs` and then `forward_native`, which is what the
parity test checks against the authors' outputs. What each argument holds (theirs, per
magicdrivedit/datasets/nuscenes_t_dataset.py and scripts/*_magicdrive.py):

  y (B, 1, L, 4096) T5 states, mask (B, L) real tokens
  maps (B, T, 8, G, G) BEV masks of frame t (float 0/1) in their layout (LoadBEVSegmentation: the
        devkit's get_map_mask, rows along LiDAR y, then transposed): maps[..., i, j] is the cell at
        LiDAR x = -50 + r i, y = -50 + r j (index 0 = farthest left / behind); our bev.npy rows run
        ahead -> behind, columns left -> right, so `bev_to_native` flips the rows and transposes
  bbox: bboxes (B V, T, M, 8, 3) corners in LiDAR(t) (their corner order, see embedders.py),
        classes (B V, T, M), masks (B V, T, M) 1 = a box seen by the view (any real corner in
        front of the camera, z_cam > 0), 0 = null (padding / unseen), -1 = masked; classes -1 where
        the box is absent in that frame; M = the batch's most boxes present in the clip (their
        collate: a sample's boxes = the union over its frames, padded to the batch's longest);
        box_latent (B V, T, M, D) one N(0, 1) draw per (sample, box), shared by frames and views
  cams (B V, T, 1, 3, 7) [K of the original image | camera -> LiDAR(t) 3 x 4]
  rel_pos (B V, T, 1, 4, 4) LiDAR(0) -> LiDAR(t) (their next2top; our traj is its inverse),
        entries below 1e-6 in magnitude set to 0 as theirs
  fps (B,) 12, or 120 for a single frame (their IMG_FPS); height, width (B,) pixels
  drop_cond_mask (B,) 1 keep / 0 drop all; drop_frame_mask (B, T) 1 keep / 0 masked frame
  mv_order_map {view: [ring neighbours]}
"""
from __future__ import annotations

import torch

from model.conditions import Conditions
from model.embedders import box_corners_authors
from pipeline.contract import schema

IMAGE_FPS = 120  # the fps the authors give single-frame samples (datasets/utils.py IMG_FPS)


def to_native(x: torch.Tensor) -> torch.Tensor:
    """(B, V, C, T', H', W') -> (B, C V, T', H', W'), channel = c V + v."""
    return x.transpose(1, 2).flatten(1, 2)


def from_native(x: torch.Tensor, views: int) -> torch.Tensor:
    """(B, C V, T', H', W') -> (B, V, C, T', H', W')."""
    return x.unflatten(1, (-1, views)).transpose(1, 2)


def fold_views(x: torch.Tensor) -> torch.Tensor:
    """(B, T, V, ...) -> (B V, T, ...)."""
    return x.transpose(1, 2).flatten(0, 1)


def bev_to_native(bev: torch.Tensor) -> torch.Tensor:
    """(..., G, G) our bev.npy layout (row i: y = 50 - r (i + 1/2), column j: x = -50 + r (j + 1/2)) ->
    their map tensor (index i along LiDAR x, j along LiDAR y, both ascending from -50 m)."""
    return bev.flip(-2).transpose(-1, -2).contiguous()


def box_inputs(cfg, cond: Conditions, box_latent: torch.Tensor | None = None,
               compact: bool = False) -> dict[str, torch.Tensor]:
    """bboxes, classes, masks (and box_latent (B, N, D) given: box_latent) (B V, T, M, ...); M >= 1 (a
    batch without boxes: one null box). compact (native_inputs), like their collate: a sample's boxes
    are those present in some frame of the clip (moved to the front, order kept), padded with null
    boxes to the batch's most; else M = N, slot n = object n (bench/box_views.py)."""
    B, T, V = cond.batch_size, cond.num_frames, cond.num_views
    if cfg.boxes_per_view:
        src = cond.view_boxes                                                          # (B, T, V, N, 7)
        present = cond.box_mask[:, :, None] | cond.box_view_mask
    else:
        N = cond.boxes.shape[2]
        src = cond.boxes[:, :, None].expand(B, T, V, N, 7)
        present = cond.box_mask[:, :, None].expand(B, T, V, N)
    cls, lat, N = cond.box_class, box_latent, src.shape[3]
    M, order = max(1, N), None
    if compact and not present.is_meta:                 # (the meta device has no values: FLOP counts)
        used = present.any(2).any(1)                                                   # (B, N) in the clip
        M = max(1, int(used.sum(1).max())) if N else 1
        order = torch.sort((~used).to(torch.int8), dim=1, stable=True).indices[:, :M]  # used first, in order
        null = torch.arange(M, device=used.device)[None] >= used.sum(1, keepdim=True)  # (B, M) padding slots
    if N == 0:                                                                         # one null box
        src, present = src.new_zeros(B, T, V, 1, 7), present.new_zeros(B, T, V, 1)
        cls = cls.new_full((B, 1), -1)
        lat = None if lat is None else lat.new_zeros(B, 1, lat.shape[-1])
    elif order is not None:
        def take(x, dim):                                                              # x[b, ..., order[b], ...]
            shape = [1] * x.dim()
            shape[0], shape[dim] = B, M
            idx = order.view(shape).expand(*[M if d == dim else x.shape[d] for d in range(x.dim())])
            return x.gather(dim, idx)
        src, present, cls = take(src, 3), take(present, 3) & ~null[:, None, None], take(cls, 1)
        lat = None if lat is None else take(lat, 1)
    src = torch.where(present[..., None], src, torch.zeros_like(src)).float()          # padding may hold anything
    true = box_corners_authors(src, lifted=False)                                      # (B, T, V, M, 8, 3)
    c2l = cond.cam2lidar.float()[:, :, :, None, None]                                  # (B, T, V, 1, 1, 4, 4)
    z_cam = ((true - c2l[..., :3, 3]) * c2l[..., :3, 2]).sum(-1)                       # camera z of each corner
    masks = (present & (z_cam > 0).any(-1)).to(torch.int32)                            # (B, T, V, M)
    corners = true if cfg.box_corners == "true" else box_corners_authors(src, lifted=True)
    in_frame = present.any(2)                                                          # (B, T, M) box in frame t
    classes = torch.where(in_frame, cls[:, None].to(torch.int32), torch.full_like(in_frame, -1, dtype=torch.int32))
    classes = classes[:, :, None].expand(masks.shape)
    out = {"bboxes": fold_views(corners), "classes": fold_views(classes), "masks": fold_views(masks)}
    if lat is not None:
        out["box_latent"] = fold_views(lat[:, None, None].expand(B, T, V, M, lat.shape[-1]))
    return out


def rel_pos(traj: torch.Tensor) -> torch.Tensor:
    """(B, T, 4, 4) LiDAR(t) -> LiDAR(0)  ->  LiDAR(0) -> LiDAR(t), small entries zeroed like theirs."""
    r, t = traj[..., :3, :3].double(), traj[..., :3, 3:].double()
    inv = torch.zeros_like(traj, dtype=torch.float64)
    inv[..., :3, :3] = r.transpose(-1, -2)
    inv[..., :3, 3:] = -r.transpose(-1, -2) @ t
    inv[..., 3, 3] = 1.0
    return torch.where(inv.abs() < 1e-6, torch.zeros_like(inv), inv).float()


def default_fps(num_frames: int, batch: int, device=None) -> torch.Tensor:
    return torch.full((batch,), float(IMAGE_FPS if num_frames == 1 else schema.FPS), device=device)


def native_inputs(model, cond: Conditions, x_shape, drop_cond: torch.Tensor | None,
                  drop_frames: torch.Tensor | None) -> dict:
    """Conditions (+ drops, this project's True = drop) -> forward_native keyword arguments."""
    cfg = model.config
    B, V, _, _, H, W = x_shape
    T = cond.num_frames
    dev = cond.text.device
    K = cond.source_intrinsics if cond.source_intrinsics is not None else cond.intrinsics
    cams = torch.cat([K[:, None].expand(B, T, V, 3, 3), cond.cam2lidar[..., :3, :4]], -1)   # (B, T, V, 3, 7)
    lat = None
    if model.bbox_embedder.mean_var is not None:
        lat = (cond if cond.box_latent is not None else with_box_latent(model, cond, None)).box_latent   # (B, N, Dc)
    bbox = box_inputs(cfg, cond, lat, compact=True)
    keep = torch.ones(B, dtype=torch.bool, device=dev) if drop_cond is None else ~drop_cond.to(dev).bool()
    keep_frames = keep[:, None].expand(B, T).clone()
    if drop_frames is not None:
        keep_frames &= ~drop_frames.to(dev).bool()
    poses = rel_pos(cond.traj)[:, :, None].expand(B, T, V, 4, 4)
    kw = dict(y=cond.text[:, None], mask=cond.text_mask, maps=bev_to_native(cond.bev.float()), bbox=bbox,
              cams=fold_views(cams.float())[:, :, None], rel_pos=fold_views(poses)[:, :, None],
              fps=cond.fps if cond.fps is not None else default_fps(T, B, dev),
              height=torch.full((B,), float(H * schema.VAE_SPATIAL_COMPRESSION)),   # read as numbers: CPU
              width=torch.full((B,), float(W * schema.VAE_SPATIAL_COMPRESSION)),
              drop_cond_mask=keep.float(), drop_frame_mask=keep_frames.float(),
              mv_order_map={v: [(v - 1) % V, (v + 1) % V] for v in range(V)})
    if cfg.map_branch == "bev_attention":
        kw["ray_cams"] = (cond.intrinsics.float(), cond.cam2lidar[:, 0].float())
    return kw


def with_box_latent(model, cond: Conditions, generator: torch.Generator | None) -> Conditions:
    if model.bbox_embedder.mean_var is None:
        return cond
    B, N = cond.box_class.shape
    lat = torch.randn(B, N, model.bbox_embedder.latent_dim, generator=generator).to(cond.text.device)
    return cond.replace(box_latent=lat)


def null_inputs(model, kw: dict, null_map: bool = False) -> dict:
    """The unconditional branch of the authors' sampler (add_null_condition + text_encoder.null):
    boxes all zero (masks 0 = null), cameras and ego poses = the learned uncond_cam values, the
    null caption y_embedding; the map kept (zeros with null_map: their test configs' use_map0)."""
    out = dict(kw)
    out["bbox"] = {k: torch.zeros_like(v) for k, v in kw["bbox"].items()}
    cams = kw["cams"]
    out["cams"] = model.camera_embedder.uncond_cam.detach().to(cams)[None, None, None].expand(cams.shape).clone()
    rp = kw["rel_pos"][..., :3, :]
    out["rel_pos"] = model.frame_embedder.uncond_cam.detach().to(rp)[None, None, None].expand(rp.shape).clone()
    L = kw["y"].shape[2]
    out["y"] = model.y_embedder.y_embedding[:L].to(kw["y"])[None, None].expand(kw["y"].shape)
    if null_map:
        out["maps"] = torch.zeros_like(kw["maps"])
    return out


def cat_inputs(a: dict, b: dict) -> dict:
    """Two kwargs sets -> one batch (a first); rel_pos of either may be 3 x 4 (the null branch)."""
    out = {}
    for k, v in a.items():
        if k == "bbox":
            out[k] = {n: torch.cat([v[n], b[k][n]]) for n in v}
        elif k == "rel_pos":
            out[k] = torch.cat([v[..., :3, :], b[k][..., :3, :]])
        elif k == "ray_cams":
            out[k] = tuple(torch.cat([p, q]) for p, q in zip(v, b[k]))
        elif isinstance(v, torch.Tensor):
            out[k] = torch.cat([v, b[k]])
        else:
            out[k] = v
    return out
