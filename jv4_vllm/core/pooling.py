"""The numbers: hidden states -> jina-embeddings-v4 vectors. Pure numpy, float32, no per-token Python."""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["EPS", "l2_normalize", "mean_pool", "multi_vector", "single_vector", "truncate_matryoshka"]

EPS = 1e-12


def l2_normalize(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Normalise the last axis to unit length (rows of a matrix, or one vector); ``out=x``
    normalises in place."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    np.maximum(norm, EPS, out=norm)
    return np.divide(x, norm, out=out)


def mean_pool(rows: np.ndarray, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Mean of rows[start:stop] accumulated in float32 (rows may be fp16)."""
    span = rows[start:stop]
    if span.shape[0] == 0:
        raise ValueError(f"empty pooling span [{start}:{stop}] over {rows.shape[0]} rows")
    return span.mean(axis=0, dtype=np.float32)


def truncate_matryoshka(vector: np.ndarray, dim: int | None, allowed: Sequence[int]) -> np.ndarray:
    """Keep the first ``dim`` components and renormalise; only the trained dims are allowed."""
    if dim is None:
        return vector
    if dim not in allowed:
        raise ValueError(f"dimensions={dim} is not one of the model's matryoshka dims {list(allowed)}")
    return l2_normalize(vector[..., :dim])


def single_vector(
    rows: np.ndarray,
    *,
    start: int = 0,
    stop: int | None = None,
    dim: int | None = None,
    allowed_dims: Sequence[int] = (),
) -> np.ndarray:
    """Mean over a token span, L2 normalised, optionally Matryoshka-truncated."""
    vector = l2_normalize(mean_pool(rows, start, stop))
    return truncate_matryoshka(vector, dim, allowed_dims)


def multi_vector(rows: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Project every token with the task's projector ([P, H] + [P]) and normalise each row."""
    projected = rows.astype(np.float32, copy=False) @ weight.T
    projected += bias
    return l2_normalize(projected)
