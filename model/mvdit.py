"""MVDiT: the MagicDrive-V2 denoiser (paper Figure 3).

latent x (B, V, 16, T', H', W')  --pad H', W' to even, patchify (1, 2, 2)-->  tokens (B, V, T', S, D)
  + spatial sincos positions (rescaled to a reference grid, so any bucket works)
  -> depth x [spatial MVDiT block (self-attn over S, cross-view attn, cross-attn, MLP),
              temporal block (self-attn over T' with RoPE, cross-attn, MLP; absent when
              config.temporal is False, the image-only stage 1: model/stages.py inserts them later)]
     each modulated by adaLN-single from the timestep; ControlNet residuals added after the first 2K
  -> final adaLN layer -> unpatchify -> crop -> velocity (B, V, 16, T', H', W').

Cross-attention keys of view v at latent frame k: [null-text slot, text tokens, traj token of
frame k, null-box slot, v's own box tokens of frame k (from view_boxes[:, v], masked to those
visible in v), v's camera token of frame k]. Keys are per (view, latent frame): (B, V, T', Lc, D).
The "null" slots make the CFG drop a masking operation: a dropped condition is replaced by its
learned null token, a kept one masks the null token out.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from model import parallel
from model.blocks import FinalLayer, STDiTBlock, rope_cos_sin, sincos_2d
from model.conditions import CONDITION_NAMES, Conditions, latent_len
from model.config import ModelConfig
from model.controlnet import BEVControlNet
from model.embedders import (BoxEmbedder, CameraEmbedder, TextProjection, TimestepEmbedder, TrajEmbedder,
                             rays_lidar)


def group_any(m: torch.Tensor) -> torch.Tensor:
    """(B, T, ...) bool -> (B, T', ...): frame 0 alone, then groups of 4 (CogVAE alignment)."""
    first, rest = m[:, :1], m[:, 1:]
    if rest.shape[1] == 0:
        return first
    return torch.cat([first, rest.reshape(m.shape[0], rest.shape[1] // 4, 4, *m.shape[2:]).any(2)], 1)


class MVDiT(nn.Module):
    sequence_parallel = None  # model/parallel.py: this rank holds a slice of the spatial tokens

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        D = cfg.hidden
        self.x_embed = nn.Linear(cfg.in_channels * cfg.patch ** 2, D)
        self.t_embedder = TimestepEmbedder(D)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))           # adaLN-single, zero-init
        self.text_proj = TextProjection(cfg.text_dim, D)
        self.camera = CameraEmbedder(D, cfg.fourier_freqs)
        self.boxes = BoxEmbedder(D, cfg.heads, cfg.cond_layers, cfg.num_classes, cfg.fourier_freqs)
        self.traj = TrajEmbedder(D, cfg.heads, cfg.cond_layers, cfg.fourier_freqs)
        # learned null embeddings for classifier-free guidance (map null = zero masks)
        self.null_text = nn.Parameter(torch.zeros(D))
        self.null_camera = nn.Parameter(torch.zeros(D))
        self.null_box = nn.Parameter(torch.zeros(D))
        self.null_traj = nn.Parameter(torch.zeros(D))
        cv = None if cfg.cross_view == "none" else cfg.cross_view
        self.blocks = nn.ModuleList(
            STDiTBlock(D, cfg.heads, cfg.mlp_ratio, temporal=t, cross_view=cv) for t in cfg.block_layout(cfg.depth))
        self.controlnet = BEVControlNet(cfg) if cfg.controlnet_depth > 0 else None
        self.final = FinalLayer(D, cfg.in_channels * cfg.patch ** 2)
        self.gradient_checkpointing = False
        self.initialize()

    # ---- initialisation: the one place ---------------------------------------------------
    def initialize(self) -> None:
        """Xavier linears, zero biases; zero: adaLN-single projection and tables (blocks start as
        identity, DiT's adaLN-Zero), cross-view gates, cross-attention outputs (PixArt), final layer, ControlNet
        input/output projections; ControlNet blocks start as copies of the base blocks."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.boxes.cls.weight, std=0.02)
        for p in (self.null_text, self.null_camera, self.null_box, self.null_traj):
            nn.init.normal_(p, std=0.02)
        self.camera.init_average()
        nn.init.zeros_(self.t_block[1].weight)
        nn.init.zeros_(self.t_block[1].bias)
        for block in self.blocks:
            nn.init.zeros_(block.scale_shift_table)
            nn.init.zeros_(block.cross_attn.proj.weight)
            if block.cross_view is not None:
                nn.init.zeros_(block.cross_view.gate)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.scale_shift_table)
        if self.controlnet is not None:
            self.controlnet.zero_init()
            for cblock, block in zip(self.controlnet.blocks, self.blocks):
                # strict=False: copies without cross-view attention (controlnet_cross_view=False) skip it
                missing = cblock.load_state_dict(block.state_dict(), strict=False).missing_keys
                assert not missing, missing

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    def _run_block(self, block: STDiTBlock, x, t0, cond, cond_mask, rope_t):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, t0, cond, cond_mask, rope_t, use_reentrant=False)
        return block(x, t0, cond, cond_mask, rope_t)

    # ---- conditions ---------------------------------------------------------------------------
    def _drops(self, drop: torch.Tensor | dict[str, torch.Tensor] | None, B: int, device) -> dict[str, torch.Tensor]:
        """drop_cond (B,) bool (INTERFACES B: text, camera, boxes, trajectory together; the map kept)
        or, as before it, {name: (B,) bool} per condition -> {name: (B,) bool}."""
        if isinstance(drop, torch.Tensor):
            drop = {name: drop for name in CONDITION_NAMES if name != "map"}
        drop = dict(drop or {})
        unknown = set(drop) - set(CONDITION_NAMES)
        if unknown:
            raise ValueError(f"drop: unknown condition names {sorted(unknown)}; use {CONDITION_NAMES}")
        out = {}
        for name in CONDITION_NAMES:
            d = drop.get(name)
            d = torch.zeros(B, dtype=torch.bool, device=device) if d is None else d.to(device=device, dtype=torch.bool)
            if d.shape != (B,):
                raise ValueError(f"drop[{name!r}]: expected a (B={B},) bool tensor, got shape {tuple(d.shape)}")
            out[name] = d
        return out

    def encode_conditions(self, cond: Conditions, drops: dict[str, torch.Tensor], height: int, width: int,
                          drop_frames: torch.Tensor | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> keys (B, V, T', Lc, D), key mask (B, V, T', Lc) bool, camera tokens (B, V, T', D).
        drop_frames (B, T) bool: those frames' boxes and trajectory are absent to their encoders."""
        keep = None if drop_frames is None else ~drop_frames.to(device=cond.traj.device, dtype=torch.bool)
        B, V = cond.batch_size, cond.num_views
        dt = self.x_embed.weight.dtype
        if cond.text.shape[-1] != self.config.text_dim:
            raise ValueError(f"Conditions.text has width {cond.text.shape[-1]} but the model expects text_dim="
                             f"{self.config.text_dim} (T5 d_model); build the model with text_dim matching the "
                             "text encoder / cache")
        # text: [null slot, L tokens]
        txt = self.text_proj(cond.text)                                                   # (B, L, D)
        txt = torch.cat([self.null_text.to(dt).expand(B, 1, -1), txt], 1)
        d = drops["text"][:, None]
        txt_mask = torch.cat([d, cond.text_mask.bool() & ~d], 1)                          # (B, 1+L)
        # camera: one token per view and latent frame (per-frame extrinsics, CogVAE groups)
        cam = self.camera(cond.intrinsics.to(dt), cond.cam2lidar.to(dt), height, width)   # (B, V, T', D)
        cam = torch.where(drops["camera"][:, None, None, None], self.null_camera.to(dt), cam)
        # trajectory: one token per latent frame
        trj = self.traj(cond.traj.to(dt), keep)                                           # (B, T', D)
        trj = torch.where(drops["traj"][:, None, None], self.null_traj.to(dt), trj)
        Tl = trj.shape[1]
        # boxes: [null slot, N tracks] per view and latent frame, from that view's own boxes; a track
        # is a key of view v if v sees it in any pixel frame of the group. Seen by v at v's exposure is
        # enough: an object that enters (or leaves) between CAM_FRONT's exposure and v's has no
        # reference box (box_mask) in that frame but does have v's box, and it is in v's image
        has_box = cond.box_mask.bool()[:, :, None] | cond.box_view_mask.bool()           # (B, T, V, N)
        if keep is not None:
            has_box = has_box & keep[:, :, None, None]
        box, _ = self.boxes(cond.view_boxes.to(dt), cond.box_class.long(), has_box)      # (B, T', V, N, D)
        seen = cond.box_view_mask.bool() if keep is None else cond.box_view_mask.bool() & keep[:, :, None, None]
        vis = group_any(seen)                                                             # (B, T', V, N)
        db = drops["boxes"][:, None, None, None]
        box = torch.cat([self.null_box.to(dt).expand(B, Tl, V, 1, -1), box], 3).transpose(1, 2)  # (B, V, T', 1+N, D)
        box_mask = torch.cat([db.expand(B, Tl, V, 1), vis & ~db], 3).transpose(1, 2)     # (B, V, T', 1+N)
        keys = torch.cat([txt[:, None, None].expand(B, V, Tl, -1, -1), trj[:, None, :, None].expand(B, V, Tl, 1, -1),
                          box, cam[:, :, :, None]], 3)                                    # (B, V, T', Lc, D)
        ones = torch.ones(B, V, Tl, 1, dtype=torch.bool, device=cam.device)
        mask = torch.cat([txt_mask[:, None, None].expand(B, V, Tl, -1), ones, box_mask, ones], 3)  # (B, V, T', Lc)
        return keys, mask, cam

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, timestep: torch.Tensor, cond: Conditions,
                drop_cond: torch.Tensor | dict[str, torch.Tensor] | None = None,
                drop_frames: torch.Tensor | None = None, controlnet_scale: float = 1.0,
                drop: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, V, C, T', H', W') noisy latent, timestep (B,) rectified-flow t in [0, 1],
        drop_cond (B,) bool = text, camera, boxes, trajectory replaced by their nulls (or {name: (B,) bool}
        per condition; `drop=` is that dict's old keyword), drop_frames (B, T) bool = boxes and
        trajectory of those frames masked -> velocity, same shape as x."""
        cfg = self.config
        if x.dim() != 6 or x.shape[2] != cfg.in_channels:
            raise ValueError(f"MVDiT: x must be (B, V, {cfg.in_channels}, T', H', W'), got {tuple(x.shape)}")
        B, V, C, Tl, H, W = x.shape
        cond.check(batch=B, views=V)
        if latent_len(cond.num_frames) != Tl:
            raise ValueError(f"MVDiT: conditions have {cond.num_frames} frames -> {latent_len(cond.num_frames)} "
                             f"latent frames, but x has T'={Tl}")
        drops = self._drops(drop if drop is not None else drop_cond, B, x.device)
        p = cfg.patch
        # odd latent sizes (424 px -> 53) are padded to the patch grid and cropped at the end
        ph, pw = (-H) % p, (-W) % p
        xp = F.pad(x, (0, pw, 0, ph))
        h, w = (H + ph) // p, (W + pw) // p
        tok = rearrange(xp, "b v c t (h p) (w q) -> b v t (h w) (c p q)", p=p, q=p)
        tok = self.x_embed(tok.to(self.x_embed.weight.dtype))                           # (B, V, T', S, D)
        tok = tok + sincos_2d(h, w, cfg.hidden, cfg.pe_base, device=x.device).to(tok.dtype)
        tok = parallel.split(self.sequence_parallel, tok, dim=3)                         # (B, V, T', S_l, D)

        t_emb = self.t_embedder(timestep)                                                 # (B, D)
        t0 = self.t_block(t_emb).view(B, 6, cfg.hidden)
        keys, key_mask, cam = self.encode_conditions(cond, drops, H * 8, W * 8, drop_frames)
        rope_t = rope_cos_sin(torch.arange(Tl, device=x.device, dtype=torch.float32), cfg.hidden // cfg.heads)

        residuals: list[torch.Tensor] = []
        if self.controlnet is not None and controlnet_scale != 0.0:
            bev = cond.bev * (~drops["map"]).to(cond.bev.dtype)[:, None, None, None, None]
            # per view and latent frame (B, V, T', S, 3)
            rays = rays_lidar(cond.intrinsics.float(), cond.cam2lidar.float(), h, w, p * 8).to(tok.dtype)
            rays = parallel.split(self.sequence_parallel, rays, dim=3)                   # (B, V, T', S_l, 3)
            residuals = self.controlnet(tok, bev, rays, cam, drops["camera"], t0, keys, key_mask, rope_t,
                                        self._run_block)
        for i, block in enumerate(self.blocks):
            tok = self._run_block(block, tok, t0, keys, key_mask, rope_t)
            if i < len(residuals):
                tok = tok + controlnet_scale * residuals[i]
        out = self.final(tok, t_emb)                                                     # (B, V, T', S_l, C*p*p)
        out = parallel.gather(self.sequence_parallel, out, dim=3)                        # (B, V, T', S, C*p*p)
        out = rearrange(out, "b v t (h w) (c p q) -> b v c t (h p) (w q)", h=h, w=w, p=p, q=p)
        return out[..., :H, :W].to(x.dtype)
