"""The BEV map branch of the ControlNet (the authors' MapControlEmbedding, MapControlTempEmbedding,
controlnet_cond_patchifier; MagicDriveDiT encode_map), and this project's former alternative.

"conv" (default, theirs):
  maps (B, T, 8, G, G), G = 200 (0.5 m) or 400 (0.25 m)
   -> per frame: conv_in, 3x3 convs (two stride-2 stages, then a stride-(2, 1) stage), conv_out
      to D/2 channels: 400 -> 53 x 100, 200 -> 28 x 50 cells (the 424x800 / 224x400 latent grids)
   -> two CogVideoX-style time downsamplings (T -> T'), each followed by a 3x3 conv (D/2 -> D/2 -> D)
   -> F.interpolate (nearest) onto the latent grid (T', H', W') when it differs
   -> controlnet_cond_patchifier (PatchEmbed3D D -> D): the same map tokens for every view
"bev_attention" (this project's former design, a config option): the same conv stack and time
  downsampling give BEV tokens; each view's token grid attends to them, its queries built from
  the viewing ray of each token (K^-1 and frame-0 cam->LiDAR rotation), so the map is placed by
  geometry instead of by interpolation; a zero-initialised projection gives the map tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.embedders import Fourier, cog_temp_down
from model.layers import CrossAttention, Mlp, PatchEmbed3D, PositionEmbedding2D


class MapControlEmbedding(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stem: tuple[int, ...]):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, stem[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for i in range(len(stem) - 2):
            self.blocks.append(nn.Conv2d(stem[i], stem[i], 3, padding=1))
            self.blocks.append(nn.Conv2d(stem[i], stem[i + 1], 3, padding=(2, 1), stride=2))
        self.blocks.append(nn.Conv2d(stem[-2], stem[-2], 3, padding=(2, 1)))
        self.blocks.append(nn.Conv2d(stem[-2], stem[-1], 3, padding=(2, 1), stride=(2, 1)))
        self.conv_out = nn.Conv2d(stem[-1], out_channels, 3, padding=1)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """(N, 8, G, G) -> (N, C, h, w)."""
        x = F.silu(self.conv_in(maps))
        for conv in self.blocks:
            x = F.silu(conv(x))
        return self.conv_out(x)


class _Pad(nn.Module):
    """One zero row on top and one zero column on the left (their hard-coded ZeroPad2d((1, 0, 1, 0)))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (1, 0, 1, 0))


class _Down(nn.Module):
    """CogVideoXDownsample3D(stride 1, compress_time): time halved (cog_temp_down), then a 3x3 conv per
    frame after one zero row/column at the bottom/right."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, T, H, W)."""
        B, C, T, H, W = x.shape
        x = cog_temp_down(x.permute(0, 2, 3, 4, 1).reshape(B, T, H * W, C))
        x = x.reshape(B, -1, H, W, C).permute(0, 4, 1, 2, 3)
        x = F.pad(x, (0, 1, 0, 1)).contiguous()   # (B, C, T, H, W) contiguous, as theirs: the CPU conv's
        T2 = x.shape[2]                           # rounding depends on its input's layout (channels-last)
        y = self.conv(x.transpose(1, 2).flatten(0, 1))
        return y.unflatten(0, (B, T2)).transpose(1, 2)


class MapControlTempEmbedding(nn.Module):
    """(B, D/2, T, h, w) -> (B, D, T', h, w) (time_downsample_factor 4.5)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv_blocks = nn.Sequential(_Pad(), _Down(dim // 2, dim // 2), _Pad(), _Down(dim // 2, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_blocks(x)


def encode_map(model, maps: torch.Tensor, views: int, latent_shape: tuple[int, int, int], h_pad: int,
               rays: torch.Tensor | None = None) -> torch.Tensor:
    """maps (B, T, 8, G, G) -> ControlNet map tokens (B * V, T' * S, D) on the (padded) token grid.
    latent_shape = (T', H', W') of the latent before padding; h_pad token rows of forced padding."""
    B, T = maps.shape[:2]
    c = model.controlnet_cond_embedder(maps.flatten(0, 1).to(model.dtype))              # (B T, D/2, h, w)
    c = c.unflatten(0, (B, T)).transpose(1, 2)                                          # (B, D/2, T, h, w)
    c = model.controlnet_cond_embedder_temp(c)                                          # (B, D, T', h, w)
    if model.config.map_branch == "bev_attention":
        return model.map_attention(c, rays, latent_shape, h_pad, model.config.patch)
    if tuple(c.shape[-3:]) != tuple(latent_shape):
        c = F.interpolate(c, size=latent_shape)                                         # nearest
    if h_pad:
        c = F.pad(c, (0, 0, 0, h_pad * model.config.patch))
    c = model.controlnet_cond_patchifier(c)                                             # (B, T' S, D)
    return c.repeat_interleave(views, 0)


class BEVAttention(nn.Module):
    """The former map branch: per view and latent frame, the view's token grid attends to the BEV
    tokens (cell positions added); queries = the token's viewing ray in LiDAR axes. Zero-init output."""

    def __init__(self, dim: int, heads: int, num_freqs: int = 4):
        super().__init__()
        self.fourier = Fourier(num_freqs)
        self.ray_mlp = Mlp(self.fourier.out_dim(3), dim, dim)
        self.pos = PositionEmbedding2D(dim)
        self.attn = CrossAttention(dim, heads)
        self.out = nn.Linear(dim, dim)

    def forward(self, bev: torch.Tensor, rays: torch.Tensor, latent_shape, h_pad: int, patch: int) -> torch.Tensor:
        """bev (B, D, T', h, w) map features; rays (B, V, S, 3) unit viewing rays of the padded token
        grid -> (B V, T' S, D)."""
        B, D, Tl, h, w = bev.shape
        V, S = rays.shape[1], rays.shape[2]
        kv = bev.permute(0, 2, 3, 4, 1).reshape(B, Tl, h * w, D)
        kv = kv + self.pos(h, w, 1.0, max(h, w), device=bev.device).to(kv.dtype)
        q = self.ray_mlp(self.fourier(rays.to(kv.dtype)))                                  # (B, V, S, D)
        q = q[:, :, None].expand(B, V, Tl, S, D).reshape(B * V * Tl, S, D)
        kv = kv[:, None].expand(B, V, Tl, h * w, D).reshape(B * V * Tl, h * w, D)
        return self.out(self.attn(q, kv)).view(B * V, Tl * S, D)


def token_rays(intrinsics: torch.Tensor, cam2lidar: torch.Tensor, h: int, w: int, stride: int) -> torch.Tensor:
    """Unit ray directions in LiDAR axes through the centres of an h x w token grid of `stride`-pixel
    cells: (B, V, 3, 3), (B, V, 4, 4) -> (B, V, h * w, 3)."""
    dev = intrinsics.device
    v, u = torch.meshgrid((torch.arange(h, device=dev) + 0.5) * stride, (torch.arange(w, device=dev) + 0.5) * stride,
                          indexing="ij")
    pix = torch.stack([u, v, torch.ones_like(u)], -1).reshape(-1, 3).double()             # (S, 3)
    d = torch.einsum("bvij,bvjk,sk->bvsi", cam2lidar[..., :3, :3].double(), torch.linalg.inv(intrinsics.double()), pix)
    return F.normalize(d, dim=-1).float()
