"""Narrower copies of the feature networks for tests: every channel count divided by ``divisor``.

The parameter names and the network's structure stay those of the published file; only tensor
widths shrink, so a test's tiny weights file goes through exactly the loader and key checks a real
one does (train/eval/weights.py reads the divisor back from the stem convolution's shape).
"""
from __future__ import annotations

from typing import Callable

DIVISORS = (1, 2, 4, 8, 16)


def channels(divisor: int) -> Callable[[int], int]:
    """n -> n // divisor (ValueError for a divisor the layouts do not support)."""
    if divisor not in DIVISORS:
        raise ValueError(f"divisor {divisor} is not one of {DIVISORS}")
    return lambda n: n // divisor
