"""Hierarchical token pooling: fewer multi-vector rows per input, the published way.

The algorithm is the one colpali-engine's ``HierarchicalTokenPooler`` (and sentence-transformers)
apply, so the published quality figures carry over. For one input's unit rows E ([n, P]):

1. the observations are the n rows of ``D = 1 - E Eᵀ``;
2. Ward linkage over their Euclidean distances;
3. ``fcluster(..., criterion="maxclust")`` at ``max(n // factor, 1)`` clusters;
4. each cluster's mean row, L2-normalised (rows in cluster-label order).

Cost. Written as published, step 2 hands the n x n matrix D to scipy, whose ``pdist`` then
walks n-dimensional rows: O(n³) scalar work. The same distances come cheaply: the 1s cancel in
a difference of rows of D, and ``|Eeᵢ - Eeⱼ|² = qᵢ + qⱼ - 2 fᵢ·eⱼ`` with ``M = EᵀE`` ([P, P]),
``F = E M`` and ``qᵢ = fᵢ·eᵢ``, so one [n, P] x [P, n] matrix product gives them all, in
float64. Linkage then runs on the condensed matrix (the upper triangle), O(n²).

Row window. Memory grows with n² (a 32k-token input would need a 4 GB distance matrix), so
inputs longer than :data:`ROW_WINDOW` rows are pooled window by window: split into equal
consecutive windows of at most that many rows, each pooled by the same factor, the results
concatenated in order. Inputs up to the window get exactly the published clusters.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from jv4_vllm.core.pooling import l2_normalize

__all__ = ["ROW_WINDOW", "pool_all", "pool_rows", "pool_tokens", "ward_distances"]

ROW_WINDOW = 2048  # rows pooled at once at most: a 2,048-row window's condensed distances are 16 MB


def ward_distances(rows: np.ndarray) -> np.ndarray:
    """Condensed Euclidean distances between the rows of ``1 - E Eᵀ`` (float64), through one
    matrix product instead of n-dimensional differences."""
    e = np.asarray(rows, dtype=np.float64)
    squared = (e @ (e.T @ e)) @ e.T  # [n, n]: fᵢ·eⱼ = (Eeᵢ)·(Eeⱼ)
    q = np.diagonal(squared).copy()
    squared *= -2.0
    squared += q[:, None]
    squared += q[None, :]
    condensed = squareform(squared, force="tovector", checks=False)  # the upper triangle, row by row
    np.maximum(condensed, 0.0, out=condensed)  # rounding can dip just below zero for near-equal rows
    return np.sqrt(condensed, out=condensed)


def pool_tokens(rows: np.ndarray, factor: int) -> np.ndarray:
    """One window's rows ([n, P], unit rows) -> ``max(n // factor, 1)`` pooled unit rows (float32)."""
    if factor < 1:
        raise ValueError(f"the pool factor must be at least 1, got {factor}")
    n = rows.shape[0]
    if factor == 1 or n <= 1:
        return rows
    labels = fcluster(linkage(ward_distances(rows), method="ward"), t=max(n // factor, 1),
                      criterion="maxclust")
    order = np.argsort(labels, kind="stable")
    ordered = labels[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # clusters in label order
    sums = np.add.reduceat(np.asarray(rows, dtype=np.float32)[order], starts, axis=0)
    return l2_normalize(sums)


def pool_rows(rows: np.ndarray, factor: int, window: int = ROW_WINDOW) -> np.ndarray:
    """An input's multi-vector pooled by ``factor``, window by window past ``window`` rows."""
    n = rows.shape[0]
    if factor == 1 or n <= window:
        return pool_tokens(rows, factor)
    parts = math.ceil(n / window)
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    return np.concatenate([pool_tokens(rows[a:b], factor) for a, b in itertools.pairwise(bounds.tolist())])


def pool_all(matrices: Sequence[np.ndarray], factor: int, window: int = ROW_WINDOW) -> list[np.ndarray]:
    """:func:`pool_rows` of every input's multi-vector."""
    return [pool_rows(matrix, factor, window) for matrix in matrices]
