"""Vector arithmetic of the serving path: L2 normalisation and Matryoshka truncation.

The running means and projections over hidden-state rows live in :mod:`jv4_vllm.core.folds`,
which is what serves; this module holds the steps they share. Pure numpy, float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["EPS", "l2_normalize", "truncate_matryoshka"]

EPS = 1e-12


def l2_normalize(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Normalise the last axis to unit length (rows of a matrix, or one vector); ``out=x``
    normalises in place."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    np.maximum(norm, EPS, out=norm)
    return np.divide(x, norm, out=out)


def truncate_matryoshka(vector: np.ndarray, dim: int | None, allowed: Sequence[int]) -> np.ndarray:
    """Keep the first ``dim`` components and renormalise; only the trained dims are allowed."""
    if dim is None:
        return vector
    if dim not in allowed:
        raise ValueError(f"dimensions={dim} is not one of the model's matryoshka dims {list(allowed)}")
    return l2_normalize(vector[..., :dim])
