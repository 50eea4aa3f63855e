"""MVDiT: the MagicDrive-V2 denoiser, module for module the authors' MagicDriveSTDiT3
(magicdrivedit/models/magicdrive/magicdrive_stdit3.py), with their parameter names, so their
state dict loads as is (model/interop/magicdrivedit.py).

    latent (B, V, 16, T', H', W')  --views into the batch (B V)-->  x_embedder (1, 2, 2)  + 2-D sincos
    condition tokens per (view, latent frame): [ego pose, camera, text (longest caption + 1), boxes]
    map tokens: conv stack -> time downsampling -> nearest interpolation onto the latent grid
    ControlNet stream c = x_control_embedder(x) + before_proj(map tokens)
    for i < control_depth: base_s, control_s (x += after_proj), base_t, control_t (x += after_proj)
    for i >= control_depth: base_s, base_t
    -> T2IFinalLayer -> unpatchify -> their prediction x0 - eps at t * 1000.

Two entry points: `forward(x, t, cond, drop_cond, drop_frames)` in this project's layout and flow
sign (INTERFACES B: t in [0, 1], returns eps - x0), and `forward_native(**their kwargs)` in theirs
(x with views folded into channels, channel = c * V + view; returns x0 - eps). The first converts
with model/native.py and calls the second, so there is one network. `guided_velocity` is the
classifier-free guidance step of their sampler (null caption, null boxes, learned null camera
and ego poses, map kept).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model import native, parallel
from model.blocks import MultiViewBlock, order_pairs, ring_order
from model.conditions import Conditions, latent_len
from model.config import ModelConfig
from model.controlnet import BEVAttention, MapControlEmbedding, MapControlTempEmbedding, encode_map, token_rays
from model.embedders import BoxEmbedder, CamEmbedder, FrameEmbedder, time_down
from model.layers import (CaptionEmbedder, FinalLayer, PatchEmbed3D, PositionEmbedding2D, RotaryEmbedding,
                          TimestepEmbedder)


class MVDiT(nn.Module):
    sequence_parallel = None  # model/parallel.py: this rank holds a slice of the spatial tokens

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        D, p = cfg.hidden, cfg.patch
        self.pos_embed = PositionEmbedding2D(D)
        self.rope = RotaryEmbedding(cfg.head_dim)
        self.x_embedder = PatchEmbed3D(p, cfg.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.y_embedder = CaptionEmbedder(cfg.text_dim, D, cfg.text_len)
        self.fps_embedder = TimestepEmbedder(D)
        self.x_control_embedder = PatchEmbed3D(p, cfg.in_channels, D) if cfg.x_control_embedder else None
        self.register_buffer("base_token", torch.randn(D))    # T5 + y_proj embedding of "" (model.text)
        self.camera_embedder = CamEmbedder(D, 7, cfg.fourier_freqs)
        self.frame_embedder = FrameEmbedder(D, cfg.cond_heads, cfg.fourier_freqs, cfg.cond_time_down, cfg.causal_cond)
        self.bbox_embedder = BoxEmbedder(D, cfg.num_classes, cfg.box_mid_dim, cfg.cond_heads, cfg.fourier_freqs,
                                         cfg.box_sample_id, cfg.cond_time_down, cfg.causal_cond)
        self.controlnet_cond_embedder = MapControlEmbedding(cfg.map_channels, D // 2, cfg.map_stem)
        self.controlnet_cond_embedder_temp = MapControlTempEmbedding(D)
        if cfg.map_branch == "conv":
            self.controlnet_cond_patchifier = PatchEmbed3D(p, D, D)
        else:
            self.map_attention = BEVAttention(D, cfg.heads, cfg.fourier_freqs)
        ring = cfg.cross_view == "ring"

        def blocks(n, **kw):
            return nn.ModuleList(MultiViewBlock(D, cfg.heads, cfg.mlp_ratio, cfg.qk_norm, rope=self.rope, **kw)
                                 for _ in range(n))
        self.base_blocks_s = blocks(cfg.depth, cross_view=ring)
        self.base_blocks_t = blocks(cfg.depth, temporal=True) if cfg.temporal else None
        self.before_proj = nn.Linear(D, D)
        self.control_blocks_s = blocks(cfg.control_depth, cross_view=ring and cfg.control_cross_view, control=True)
        self.control_blocks_t = blocks(cfg.control_depth, temporal=True, control=True) if cfg.control_temporal else None
        self.final_layer = FinalLayer(D, p * p * cfg.in_channels)
        self.gradient_checkpointing = False
        self.initialize()

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    # ---- initialisation: the one place ---------------------------------------------------
    def initialize(self) -> None:
        """The authors' initialize_weights: Xavier linears with zero biases; zero: mva_proj, the
        temporal blocks' attention and cross-attention outputs, the ControlNet's after_proj and
        before_proj, the condition encoders' final projections; N(0, 0.02): the encoders' MLPs and
        emb2token. Their temporal mlp.fc2 zero-init is a no-op in their code (a Parameter, not a
        Linear) and stays Xavier here too. ControlNet blocks start as copies of the first base
        blocks, as the authors' loaders do from PixArt / STDiT-3 weights."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for blk in self.base_blocks_t or []:
            _zero(blk.attn.proj, blk.cross_attn.proj)
        for cb, bb in zip(self.control_blocks_s, self.base_blocks_s):
            missing = cb.load_state_dict(bb.state_dict(), strict=False).missing_keys
            assert all(k.startswith("after_proj") for k in missing), missing
        for cb, bb in zip(self.control_blocks_t or [], self.base_blocks_t or []):
            cb.load_state_dict(bb.state_dict(), strict=False)
        for blk in list(self.base_blocks_s) + list(self.control_blocks_s) + list(self.control_blocks_t or []):
            if blk.cross_view:
                _zero(blk.mva_proj)
            if blk.after_proj is not None:
                _zero(blk.after_proj)
        _zero(self.before_proj, self.bbox_embedder.final_proj, self.camera_embedder.after_proj,
              self.frame_embedder.final_proj)
        if hasattr(self, "controlnet_cond_patchifier"):
            w = self.controlnet_cond_patchifier.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        else:
            _zero(self.map_attention.out)
        with torch.no_grad():
            for lin in (self.bbox_embedder.mlp.fc1, self.bbox_embedder.mlp.fc2, self.frame_embedder.mlp.fc1,
                        self.frame_embedder.mlp.fc2, self.camera_embedder.emb2token):
                lin.weight.normal_(0, 0.02)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    def _run(self, block, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    # ---- conditions (their encode_text / encode_box / encode_cam / encode_cond_sequence) -----
    def encode_text(self, y: torch.Tensor, mask: torch.Tensor | None, keep: torch.Tensor | None) -> torch.Tensor:
        """y (B, 1, L, C) T5 states; mask (B', L) real tokens -> (B, L', D), L' = the longest caption
        + 1 (the first padding token's T5 state), at most L. Never masked; a dropped sample
        (keep False) takes the null caption's first L' tokens."""
        y = self.y_embedder(y[:, 0].to(self.dtype), keep)                                # (B, L, D)
        if mask is not None and not mask.is_meta:   # (the meta device has no values: FLOP counts use all L)
            if mask.shape[0] != y.shape[0]:
                mask = mask.repeat(y.shape[0] // mask.shape[0], 1)
            y = y[:, : int(min(int(mask.sum(1).max()) + 1, y.shape[1]))]
        return y

    def encode_box(self, bbox: dict, keep: torch.Tensor) -> torch.Tensor:
        """bbox: bboxes (N, T, M, 8, 3), classes (N, T, M), masks (N, T, M) 1 keep / 0 null / -1 mask,
        box_latent (N, T, M, Dc) optional; keep (N, T) bool (False: this frame's real boxes masked)."""
        masks = bbox["masks"]
        null = masks != 0
        shown = (masks != -1) & ~((masks == 1) & ~keep[:, :, None])
        return self.bbox_embedder(bbox["bboxes"].to(self.dtype), bbox["classes"], null, shown, bbox.get("box_latent"))

    def encode_cond_sequence(self, bbox, cams, rel_pos, y, mask, drop_cond_mask, drop_frame_mask) -> torch.Tensor:
        """-> keys (B V, T', 1 + 1 + L' + M, D): [ego pose, camera, text, boxes] per view and latent frame."""
        b = y.shape[0]
        views = cams.shape[0] // b
        keep_cond = drop_cond_mask > 0
        keep_frame = drop_frame_mask > 0
        txt = self.encode_text(y, mask, keep_cond).repeat_interleave(views, 0)             # (B V, L', D)
        base = self.base_token.to(self.dtype)
        parts = []
        if bbox is not None:
            keep_box = (keep_cond[:, None] & keep_frame).repeat_interleave(views, 0)       # (B V, T)
            parts.append(base + self.encode_box(bbox, keep_box))                           # (B V, T', M, D)
        keep_cam = keep_cond.repeat_interleave(views, 0)
        if self.config.camera_per_frame:
            T = cams.shape[1]
            cam = self.camera_embedder(cams[:, :, 0].flatten(0, 1).to(self.dtype), keep_cam.repeat_interleave(T, 0))
            cam = time_down(cam.view(-1, T, 1, cam.shape[-1]), self.config.cond_time_down)
        else:
            cam = self.camera_embedder(cams[:, 0, 0].to(self.dtype), keep_cam)[:, None, None]   # (B V, 1, 1, D)
        frame = self.frame_embedder(rel_pos[:, :, 0].to(self.dtype), keep_frame.repeat_interleave(views, 0))
        frame = base + frame[:, :, None]                                                    # (B V, T', 1, D)
        Tl = frame.shape[1]
        cam = (base + cam).expand(-1, Tl, -1, -1)
        txt = txt[:, None].expand(-1, Tl, -1, -1)
        return torch.cat([frame, cam, txt] + parts, 2)

    # ---- forward in the authors' layout ----------------------------------------------------
    def forward_native(self, x, timestep, y, maps, bbox, cams, rel_pos, fps, height, width, drop_cond_mask=None,
                       drop_frame_mask=None, mv_order_map=None, t_order_map=None, mask=None, x_mask=None,
                       ray_cams=None, **kwargs) -> torch.Tensor:
        """Their MagicDriveSTDiT3.forward: x (B, C V, T', H', W'), timestep (B,) in [0, 1000] ->
        x0 - eps, same layout, float32. See model/interop/magicdrivedit.py for every argument."""
        cfg = self.config
        dt = self.dtype
        B, real_T = x.shape[0], rel_pos.shape[1]
        if drop_cond_mask is None:
            drop_cond_mask = torch.ones(B, device=x.device)
        if drop_frame_mask is None:
            drop_frame_mask = torch.ones(B, real_T, device=x.device)
        NC = len(mv_order_map) if mv_order_map is not None else x.shape[1] // cfg.in_channels
        pairs = order_pairs(mv_order_map) if mv_order_map is not None else ring_order(NC)
        C = x.shape[1] // NC
        x = x.to(dt).unflatten(1, (C, NC)).transpose(1, 2).flatten(0, 1)                  # (B NC, C, T', H', W')
        Tx, Hx, Wx = x.shape[2:]
        p = cfg.patch
        T, H, W = Tx, -(-Hx // p), -(-Wx // p)
        S = H * W
        h_pad = 0
        if cfg.force_pad_h and S % cfg.force_pad_h:
            h_pad = cfg.force_pad_h - H % cfg.force_pad_h
            x = F.pad(x, (0, 0, 0, h_pad * p))
            H += h_pad
            S = H * W
        scale = math.sqrt(float(height[0]) * float(width[0])) / cfg.input_sq_size
        pos = self.pos_embed(H, W, scale, round(S ** 0.5), device=x.device).to(dt)          # (S, D)

        t = self.t_embedder(timestep) + self.fps_embedder(_per_sample(fps, B))
        t_mlp = self.t_block(t)
        t0 = t0_mlp = None
        if x_mask is not None:
            t0 = self.t_embedder(torch.zeros_like(timestep)) + self.fps_embedder(_per_sample(fps, B))
            t0_mlp = self.t_block(t0)
            x_mask = x_mask.bool().repeat_interleave(NC, 0)

        y = self.encode_cond_sequence(bbox, cams, rel_pos, y, mask, drop_cond_mask, drop_frame_mask)
        if y.shape[1] not in (1, T):
            raise ValueError(f"condition tokens have {y.shape[1]} latent frames, the latent {T}")
        rays = None
        if cfg.map_branch == "bev_attention":
            if ray_cams is None:
                raise ValueError("map_branch 'bev_attention' needs ray_cams (intrinsics, cam2lidar of frame 0)")
            rays = token_rays(*ray_cams, H, W, p * 8)
        c = encode_map(self, maps, NC, (Tx, Hx, Wx), h_pad, rays).view(B * NC, T, S, -1)

        xb = self.x_embedder(x).view(B * NC, T, S, -1) + pos
        xc = xb if self.x_control_embedder is None else self.x_control_embedder(x).view(B * NC, T, S, -1) + pos
        c = xc + self.before_proj(c)
        sp = self.sequence_parallel
        xb, c = parallel.split(sp, xb, dim=2), parallel.split(sp, c, dim=2)               # (B NC, T', S_l, D)
        Sl = xb.shape[2]
        x, c = xb.flatten(1, 2), c.flatten(1, 2)
        args = (y, t_mlp, t0_mlp, x_mask, T, Sl, NC, pairs)
        for i in range(cfg.depth):
            x = self._run(self.base_blocks_s[i], x, *args)
            if i < cfg.control_depth:
                c, skip = self._run(self.control_blocks_s[i], c, *args)
                x = x + skip
            if self.base_blocks_t is not None:
                x = self._run(self.base_blocks_t[i], x, *args)
            if i < cfg.control_depth and self.control_blocks_t is not None:
                c, skip = self._run(self.control_blocks_t[i], c, *args)
                x = x + skip
        # the head is per token: on this rank's tokens, so each parameter's gradient comes once per token
        x = self.final_layer(x.view(B * NC, T, Sl, -1), t.repeat_interleave(NC, 0),
                             None if t0 is None else t0.repeat_interleave(NC, 0), x_mask)   # (B NC, T', S_l, p p C)
        x = parallel.gather(sp, x, dim=2)                                                   # (B NC, T', S, p p C)
        x = x.reshape(B * NC, T, H, W, p, p, C).permute(0, 6, 1, 2, 4, 3, 5).reshape(B * NC, C, T, H * p, W * p)
        x = x[:, :, :Tx, :Hx, :Wx].float()
        return x.unflatten(0, (B, NC)).transpose(1, 2).flatten(1, 2)                      # (B, C NC, T', H', W')

    # ---- forward in this project's layout and flow sign (INTERFACES B) -------------------
    def forward(self, x: torch.Tensor, timestep: torch.Tensor, cond: Conditions, drop_cond: torch.Tensor | None = None,
                drop_frames: torch.Tensor | None = None, x_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, V, C, T', H', W') noisy latent, timestep (B,) in [0, 1] (0 data, 1 noise),
        drop_cond (B,) bool: text, camera, boxes and ego poses replaced by their nulls; drop_frames
        (B, T) bool: boxes and ego pose of those pixel frames masked; x_mask (B, T') bool: False =
        a clean context frame -> the velocity eps - x0, same shape, float32."""
        self._check(x, cond)
        kw = native.native_inputs(self, cond, x.shape, drop_cond, drop_frames)
        out = self.forward_native(native.to_native(x), timestep * 1000.0, x_mask=x_mask, **kw)
        return -native.from_native(out, x.shape[1])

    def guided_velocity(self, x: torch.Tensor, timestep: torch.Tensor, cond: Conditions, cfg_scale: float = 2.0,
                        null_map: bool = False) -> torch.Tensor:
        """Classifier-free guidance as the authors' sampler: the conditional and the null branch
        (null caption, null boxes, learned null camera and ego poses; the map kept, or zeros with
        null_map as in their test configs) in one batch, v = v_null + s (v_cond - v_null)."""
        self._check(x, cond)
        kw = native.native_inputs(self, cond, x.shape, None, None)
        both = native.cat_inputs(kw, native.null_inputs(self, kw, null_map))
        xn = native.to_native(x)
        out = self.forward_native(torch.cat([xn, xn]), torch.cat([timestep, timestep]) * 1000.0, **both)
        pc, pu = out.chunk(2)
        return -native.from_native(pu + cfg_scale * (pc - pu), x.shape[1])

    def draw_box_latent(self, cond: Conditions, generator: torch.Generator | None = None) -> Conditions:
        """cond with its per-box latent drawn (once per sample, shared over frames and views, as the
        authors' add_box_latent); a sampler draws it once and keeps it for every step."""
        return native.with_box_latent(self, cond, generator)

    def _check(self, x: torch.Tensor, cond: Conditions) -> None:
        cfg = self.config
        if x.dim() != 6 or x.shape[2] != cfg.in_channels:
            raise ValueError(f"MVDiT: x must be (B, V, {cfg.in_channels}, T', H', W'), got {tuple(x.shape)}")
        cond.check(batch=x.shape[0], views=x.shape[1])
        if latent_len(cond.num_frames) != x.shape[3]:
            raise ValueError(f"MVDiT: conditions have {cond.num_frames} frames -> {latent_len(cond.num_frames)} "
                             f"latent frames, but x has T'={x.shape[3]}")
        if cond.text.shape[-1] != cfg.text_dim:
            raise ValueError(f"Conditions.text has width {cond.text.shape[-1]} but the model expects text_dim="
                             f"{cfg.text_dim} (T5 d_model); build the model with text_dim matching the "
                             "text encoder / cache")


def _zero(*linears: nn.Linear) -> None:
    with torch.no_grad():
        for lin in linears:
            lin.weight.zero_()
            if lin.bias is not None:
                lin.bias.zero_()


def _per_sample(fps: torch.Tensor, B: int) -> torch.Tensor:
    fps = torch.as_tensor(fps).flatten()
    return fps.repeat(B // fps.shape[0]) if fps.shape[0] != B else fps
