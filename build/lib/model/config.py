"""ModelConfig: every size/shape knob of MVDiT. Checkpoints carry `to_dict()` so a model can be
rebuilt exactly with `ModelConfig.from_dict(d)`.

The defaults are the authors' MagicDriveSTDiT3-XL/2 of their stage-3 config (MagicDriveDiT,
configs/magicdrive/train/stage3_*.py): the released checkpoint loads into `MVDiT(ModelConfig())`
by key renaming alone (model/interop/magicdrivedit.py). The fields after "this project's
extensions" are data/conditioning choices of this project on the same weights; their defaults
reproduce the authors' network exactly (docs/model.md says what each changes).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

CROSS_VIEW = ("ring", "none")
COND_TIME_DOWN = ("cog", "mean")        # the authors' time_downsample_factor 4.5 (stage 2, 3) / -1 (stage 1)
BOX_CORNERS = ("authors", "true")
MAP_BRANCH = ("conv", "bev_attention")


@dataclass
class ModelConfig:
    hidden: int = 1152              # token width D
    depth: int = 28                 # spatial blocks (and temporal blocks when `temporal`), STDiT-3-XL/2
    heads: int = 16
    mlp_ratio: float = 4.0
    in_channels: int = 16           # CogVAE latent channels
    patch: int = 2                  # spatial patch; temporal patch is 1 (PatchEmbed3D (1, 2, 2))
    text_dim: int = 4096            # T5-v1.1-XXL d_model (caption_channels)
    text_len: int = 300             # T5 tokens of the null caption y_embedding (model_max_length)
    qk_norm: bool = True            # RMS-norm of q and k in the blocks' self-attention
    input_sq_size: int = 512        # position-embedding scale = sqrt(H x W pixels) / input_sq_size
    temporal: bool = True           # base_blocks_t (with_temp_block); False = the authors' stage 1
    control_depth: int = 13         # ControlNet blocks (control_blocks_s, control_blocks_t); 0 = none
    control_temporal: bool = True   # control_blocks_t (not control_skip_temporal); stage 1: False
    control_cross_view: bool = False  # the authors' control_skip_cross_view=True
    x_control_embedder: bool = True   # the ControlNet embeds the noisy latent with its own PatchEmbed3D
    cross_view: str = "ring"        # "ring": each view attends to its two ring neighbours (mv_order_map)
    num_classes: int = 10           # schema.OBJECT_CLASSES
    box_mid_dim: int = 512          # bbox embedder proj_dims [D, 512, 512, D]
    fourier_freqs: int = 4          # Fourier bands of box corners and camera / ego-pose columns
    cond_heads: int = 8             # heads of the box / ego-pose temporal encoders
    box_sample_id: bool = True      # per-class learned mean/var of a random per-box latent (sample_id)
    cond_time_down: str = "cog"     # box / ego-pose tokens T -> T': "cog" (CogVideoX x2 x2) or "mean"
    map_channels: int = 8           # schema.MAP_CLASSES
    map_stem: tuple[int, ...] = (16, 32, 96, 256)  # MapControlEmbedding block_out_channels
    force_pad_h: int = 0            # pad the token rows so H x W tokens divide by this (their
                                    # force_pad_h_for_sp_size: 8 in their 848x1600 test configs); 0 = off
    # ---- this project's extensions (defaults = the authors' network) -------------------------
    boxes_per_view: bool = False    # each view conditions on its own view_boxes at its own exposure
                                    # (False: the reference boxes repeated for every view, as theirs)
    box_corners: str = "authors"    # "authors": corners of their box tensor, the centre read as the
                                    # bottom centre (their data); "true": the box's real 8 corners
    camera_per_frame: bool = False  # camera tokens of every frame, CogVideoX-downsampled (else frame 0)
    causal_cond: bool = False       # box / ego-pose temporal encoders attend to past frames only
    map_branch: str = "conv"        # "conv": their map conv stack interpolated onto the latent grid;
                                    # "bev_attention": each view's tokens attend to the BEV tokens by ray

    def __post_init__(self):
        self.map_stem = tuple(int(c) for c in self.map_stem)
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise ValueError(f"ModelConfig: hidden {self.hidden} must split into {self.heads} heads of even size")
        if self.hidden % self.cond_heads or (self.hidden // self.cond_heads) % 2:
            raise ValueError(f"ModelConfig: hidden {self.hidden} must split into cond_heads={self.cond_heads} "
                             "heads of even size")
        if self.hidden % 4:
            raise ValueError(f"ModelConfig: hidden {self.hidden} must be a multiple of 4 (2-D sincos positions)")
        if not 0 <= self.control_depth <= self.depth:
            raise ValueError(f"ModelConfig: control_depth {self.control_depth} must be in [0, depth={self.depth}]")
        if len(self.map_stem) < 2:
            raise ValueError(f"ModelConfig: map_stem {self.map_stem} needs at least 2 widths")
        for name, allowed in (("cross_view", CROSS_VIEW), ("cond_time_down", COND_TIME_DOWN),
                              ("box_corners", BOX_CORNERS), ("map_branch", MAP_BRANCH)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ModelConfig: {name} {getattr(self, name)!r}; use one of {allowed}")
        if self.force_pad_h < 0:
            raise ValueError(f"ModelConfig: force_pad_h {self.force_pad_h} must be >= 0")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["map_stem"] = list(self.map_stem)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"ModelConfig.from_dict: unknown keys {sorted(unknown)} (known: {sorted(known)})")
        return cls(**d)
