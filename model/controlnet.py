"""BEV map ControlNet (paper Section 4.3, Figure 4(a); MagicDrive's map branch).

map masks (B, T, 8, 200, 200)
  -> conv stem per frame (3 x stride 2)                      (B, T, D, 25, 25)
  -> temporal downsampling shaped like CogVAE's (two stages; each keeps the first frame and
     merges the following frames pairwise with a trainable linear map initialised to the
     average, as the VAE's time-compressing DownSample3D does)  (B, T', 625, D)
  -> per view and latent frame: the view's token grid cross-attends to the BEV tokens; its
     queries are the token's viewing ray in LiDAR(t) axes (from K^-1 and the latent frame's
     cam2lidar, CogVAE-grouped) + the view's camera token of that frame, the keys
     carry the BEV cell position, so attention can learn the ground-plane <-> image mapping
     (B, V, T', S, D)
  -> zero-initialised projection added to the noisy-latent tokens
  -> copies of the first K backbone block pairs (same conditions, same timestep; spatial blocks
     only when cfg.temporal is False; without cross-view attention when cfg.controlnet_cross_view
     is False, as the authors' stage configs)
  -> one zero-initialised linear per block, added to the output of the matching base block.
"""
from __future__ import annotations

import torch
from torch import nn

from model.blocks import Attention, Mlp, STDiTBlock, sincos_2d
from model.config import ModelConfig
from model.embedders import Fourier


class TemporalDown2(nn.Module):
    """(B, T, ...C) with T = 1 + 2k -> (B, 1 + k, ...C): frame 0 kept, then frames (2j-1, 2j) merged."""

    def __init__(self, dim: int):
        super().__init__()
        self.merge = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, N, D)."""
        B, T, N, D = x.shape
        if T == 1:
            return x
        pairs = x[:, 1:].reshape(B, (T - 1) // 2, 2, N, D).permute(0, 1, 3, 2, 4).flatten(-2)  # (B, k, N, 2D)
        return torch.cat([x[:, :1], self.merge(pairs)], 1)

    def init_average(self) -> None:
        D = self.merge.out_features
        with torch.no_grad():
            eye = torch.eye(D) / 2
            self.merge.weight.copy_(torch.cat([eye, eye], 1))
            self.merge.bias.zero_()


class BEVControlNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.hidden
        chans = (cfg.map_channels, *cfg.bev_stem)
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.SiLU()]
        layers.append(nn.Conv2d(chans[-1], D, 1))
        self.stem = nn.Sequential(*layers)
        self.down = nn.ModuleList([TemporalDown2(D), TemporalDown2(D)])          # 2 x 2 = CogVAE's 4
        self.ray_fourier = Fourier(cfg.fourier_freqs)
        self.ray_mlp = Mlp(self.ray_fourier.out_dim(3), D, D)
        self.null_ray = nn.Parameter(torch.zeros(D))
        self.norm_bev = nn.LayerNorm(D, eps=1e-6)
        self.bev_attn = Attention(D, cfg.heads)
        self.input_proj = nn.Linear(D, D)                                       # zero-init
        layout = cfg.block_layout(cfg.controlnet_depth)
        cv = None if (cfg.cross_view == "none" or not cfg.controlnet_cross_view) else cfg.cross_view
        self.blocks = nn.ModuleList(STDiTBlock(D, cfg.heads, cfg.mlp_ratio, temporal=t, cross_view=cv) for t in layout)
        self.out_projs = nn.ModuleList(nn.Linear(D, D) for _ in layout)  # zero-init
        self.stride = cfg.patch * 8                                               # pixels per token

    def bev_tokens(self, bev: torch.Tensor) -> torch.Tensor:
        """(B, T, C, Hb, Wb) -> (B, T', g*g, D) with the BEV cell position added."""
        B, T = bev.shape[:2]
        f = self.stem(bev.flatten(0, 1).to(self.stem[0].weight.dtype))        # (B*T, D, g, g')
        g1, g2 = f.shape[-2:]
        f = f.flatten(2).transpose(1, 2).reshape(B, T, g1 * g2, -1)          # (B, T, G, D)
        for down in self.down:
            f = down(f)
        return f + sincos_2d(g1, g2, f.shape[-1], base=float(max(g1, g2)), device=f.device).to(f.dtype)

    def forward(self, x: torch.Tensor, bev: torch.Tensor, rays: torch.Tensor, cam_tok: torch.Tensor,
                drop_camera: torch.Tensor, t0: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor,
                rope_t, run_block) -> list[torch.Tensor]:
        """x (B, V, T', S, D) embedded noisy latent; bev (B, T, C, Hb, Wb) (zeros where dropped);
        rays (B, V, T', S, 3) per latent frame; cam_tok (B, V, T', D) (already null where dropped);
        drop_camera (B,) bool. Returns one residual (B, V, T', S, D) per ControlNet block, already projected."""
        kv = self.norm_bev(self.bev_tokens(bev))                                # (B, T', G, D)
        q = self.ray_mlp(self.ray_fourier(rays))                                 # (B, V, T', S, D)
        q = torch.where(drop_camera[:, None, None, None, None], self.null_ray.to(q.dtype), q) + cam_tok[..., None, :]
        view_bev = self.bev_attn(q, kv[:, None])                                 # keys broadcast over V
        h = x + self.input_proj(view_bev)
        out = []
        for block, proj in zip(self.blocks, self.out_projs):
            h = run_block(block, h, t0, cond, cond_mask, rope_t)
            out.append(proj(h))
        return out

    def zero_init(self) -> None:
        for lin in [self.input_proj, *self.out_projs]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        for down in self.down:
            down.init_average()
