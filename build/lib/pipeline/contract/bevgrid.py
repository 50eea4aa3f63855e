"""The BEV grids of the sample contract (re-exported by pipeline/contract/schema.py, which documents the
orientation): the per-bucket rule, cell centres, and the bit packing. numpy only."""
from __future__ import annotations

import numpy as np

BEV_EXTENT_M = 100.0                   # the square around the ego every grid covers
BEV_CELLS, BEV_RESOLUTION_M = 200, 0.5  # the small grid (buckets below BEV_LARGE_MIN_HEIGHT)
BEV_LARGE_CELLS, BEV_LARGE_RESOLUTION_M = 400, 0.25
BEV_LARGE_MIN_HEIGHT = 424
BEV_GRIDS = ((BEV_CELLS, BEV_RESOLUTION_M), (BEV_LARGE_CELLS, BEV_LARGE_RESOLUTION_M))
BEV_PACKED_COLS = (BEV_CELLS + 7) // 8  # of the small grid


def bev_grid(height: int) -> tuple[int, float]:
    """(cells, cell_m) of a bucket's BEV map, the authors' rule: 200 x 0.5 m for 224x400 (and smaller),
    400 x 0.25 m for 424x800 and 848x1600."""
    return BEV_GRIDS[1] if height >= BEV_LARGE_MIN_HEIGHT else BEV_GRIDS[0]


def bev_packed_cols(cells: int) -> int:
    return (cells + 7) // 8


def bev_cell_centres(cells: int = BEV_CELLS) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) LiDAR coordinates of every cell centre of a cells x cells grid, each (G, G), as documented above."""
    c = (np.arange(cells) + 0.5) * (BEV_EXTENT_M / cells)
    x = -BEV_EXTENT_M / 2 + c  # by column
    y = BEV_EXTENT_M / 2 - c   # by row
    return np.broadcast_to(x[None, :], (cells, cells)), np.broadcast_to(y[:, None], (cells, cells))


def pack_bev(masks: np.ndarray) -> np.ndarray:
    """(..., G, G) bool -> (..., G, G / 8) uint8."""
    return np.packbits(np.asarray(masks, dtype=bool), axis=-1)


def unpack_bev(packed: np.ndarray, cells: int | None = None) -> np.ndarray:
    """(..., G, G / 8) uint8 -> (..., G, G) bool; G = the row count unless given."""
    return np.unpackbits(packed, axis=-1, count=cells or packed.shape[-2]).astype(bool)
