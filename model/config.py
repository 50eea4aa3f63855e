"""ModelConfig: every size/shape knob of MVDiT. Checkpoints carry `to_dict()` so a model can be
rebuilt exactly with `ModelConfig.from_dict(d)`."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class ModelConfig:
    hidden: int = 1152            # token width D
    depth: int = 28               # (spatial, temporal) block pairs, STDiT-3-XL/2 = 28
    heads: int = 16
    mlp_ratio: float = 4.0
    in_channels: int = 16         # CogVAE latent channels
    patch: int = 2                # spatial patch; temporal patch is 1 (patchify (1, 2, 2))
    text_dim: int = 4096          # T5-v1.1-XXL hidden size
    num_classes: int = 10         # schema.OBJECT_CLASSES
    map_channels: int = 8         # schema.MAP_CLASSES
    cross_view: str = "ring"      # "ring" (2 neighbours, MagicDrive) or "all"
    fourier_freqs: int = 8        # Fourier features for box corners / poses / camera / rays
    cond_layers: int = 1          # temporal-transformer layers of the box / trajectory encoders
    controlnet_depth: int = 13    # K: block pairs copied into the BEV ControlNet (0 = no ControlNet)
    bev_stem: tuple[int, ...] = (32, 96, 256)  # conv stem widths, each stride 2: 200 -> 25 cells
    pe_base: float = 32.0         # spatial sincos positions rescaled to a base x base token grid
    temporal: bool = True         # False: spatial blocks only (paper stage 1); stage 2 inserts them as identities
    controlnet_cross_view: bool = True  # False: the ControlNet's block copies skip cross-view attention

    def __post_init__(self):
        self.bev_stem = tuple(int(c) for c in self.bev_stem)
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise ValueError(f"ModelConfig: hidden {self.hidden} must split into {self.heads} heads of even size")
        if not 0 <= self.controlnet_depth <= self.depth:
            raise ValueError(f"ModelConfig: controlnet_depth {self.controlnet_depth} must be in [0, depth={self.depth}]")
        if self.cross_view not in ("ring", "all", "none"):
            raise ValueError(f"ModelConfig: cross_view {self.cross_view!r}; use 'ring', 'all' or 'none'")

    def block_layout(self, pairs: int) -> list[bool]:
        """Whether each block of a stack of `pairs` is temporal: (spatial, temporal) pairs, or spatial
        only when `temporal` is False (paper stage 1). Base and ControlNet share it, so ControlNet
        residual i always lands after base block i."""
        return [False, True] * pairs if self.temporal else [False] * pairs

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bev_stem"] = list(self.bev_stem)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"ModelConfig.from_dict: unknown keys {sorted(unknown)} (known: {sorted(known)})")
        return cls(**d)
