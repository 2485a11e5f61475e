"""The scalar side of merging that config validation needs without importing torch: the
parallel-vectors threshold and the normalisation of user weights."""

from __future__ import annotations

import math
from collections.abc import Sequence

DOT_THRESHOLD = 0.9995
"""Above this |cos| two tensors count as parallel: slerp's angle is too small (or too close to pi)
to be trusted, and slerp falls back to linear interpolation, as mergekit does."""


def normalize_weights(weights: Sequence[float]) -> list[float]:
    """Weights scaled to sum to 1; they must be non-negative with a positive sum."""
    values = [float(w) for w in weights]
    if not values:
        raise ValueError("need at least one weight")
    if any(not math.isfinite(w) or w < 0 for w in values):
        raise ValueError(f"weights must be finite and non-negative, got {values}")
    total = sum(values)
    if total <= 0:
        raise ValueError(f"weights must not all be zero, got {values}")
    return [w / total for w in values]
