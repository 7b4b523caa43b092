"""Running pooling state: hidden-state rows in, jina-embeddings-v4 vectors out.

A :class:`SpanFold` covers one token sequence (one prompt, or one late-chunked document
sent in windows). It owns output spans over that sequence's positions: single-vector
spans keep a float64 running sum of their rows, multi-vector spans keep their rows
projected to the task's 128-d space. Rows arrive slab by slab, in any order across
windows; nothing else of the hidden states is kept.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from jv4_vllm.core.pooling import l2_normalize, truncate_matryoshka

__all__ = ["Projector", "SpanFold", "WindowSink"]

Span = tuple[int, int]
Partial = tuple[int, np.ndarray, int]  # (single span, float32 sum of its rows in one slab, rows)


class Projector:
    """The task's multi-vector projector, laid out once for fast row projection."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray) -> None:
        self.weight_t = np.ascontiguousarray(weight.T, dtype=np.float32)  # [H, P]
        self.bias = np.asarray(bias, dtype=np.float32)

    @property
    def dim(self) -> int:
        return int(self.bias.shape[0])

    def into(self, rows: np.ndarray, out: np.ndarray) -> None:
        """Project float32 ``rows`` ([n, H]) straight into ``out`` ([n, P]) and normalise them there:
        no temporary the size of the result."""
        np.matmul(rows, self.weight_t, out=out)
        out += self.bias
        l2_normalize(out, out=out)


class SpanFold:
    """Pools the rows of one sequence into one output per span (thread-safe ``feed``)."""

    def __init__(self, single_spans: Sequence[Span] = (), multi_spans: Sequence[Span] = (),
                 projector: Projector | None = None) -> None:
        if multi_spans and projector is None:
            raise ValueError("multi-vector spans need the task's projector")
        self._single = list(single_spans)
        self._multi = list(multi_spans)
        self._projector = projector
        self._sums = np.zeros((len(self._single), 0), dtype=np.float64)
        self._counts = [0] * len(self._single)
        self._rows = [np.empty((stop - start, projector.dim), dtype=np.float32) for start, stop in self._multi] \
            if projector is not None else []
        self._lock = threading.Lock()

    def feed(self, position: int, rows: np.ndarray) -> list[Partial]:
        """Rows ([n, H], float32; fp16 rows are summed in float32 too) of positions
        ``position .. position + n``; sums accumulate in float32 within a slab and float64 across
        slabs, projections run in float32. Returns what was added to the sums."""
        end = position + rows.shape[0]
        partial: list[Partial] = []
        for k, (start, stop) in enumerate(self._single):
            lo, hi = max(start, position), min(stop, end)
            if lo < hi:
                partial.append((k, rows[lo - position:hi - position].sum(axis=0, dtype=np.float32), hi - lo))
        for k, (start, stop) in enumerate(self._multi):
            lo, hi = max(start, position), min(stop, end)
            if lo < hi:
                self._projector.into(rows[lo - position:hi - position], self._rows[k][lo - start:hi - start])  # type: ignore[union-attr]
        if partial:
            self._add(partial, sign=1)
        return partial

    def withdraw(self, partial: list[Partial]) -> None:
        """Take back sums that :meth:`feed` returned (a call that broke off is retried in full;
        its multi-vector rows are simply written again)."""
        if partial:
            self._add(partial, sign=-1)

    def _add(self, partial: list[Partial], sign: int) -> None:
        with self._lock:
            if self._sums.shape[1] == 0:
                self._sums = np.zeros((len(self._single), partial[0][1].shape[0]), dtype=np.float64)
            for k, total, count in partial:
                self._sums[k] += sign * total.astype(np.float64)
                self._counts[k] += sign * count

    def single_vectors(self, dim: int | None, allowed_dims: Sequence[int]) -> list[np.ndarray]:
        """Mean of each single span, L2-normalised, Matryoshka-truncated; checks every row arrived."""
        vectors = []
        for k, (start, stop) in enumerate(self._single):
            if self._counts[k] != stop - start:
                raise RuntimeError(f"span {start}:{stop} pooled {self._counts[k]} rows")
            mean = (self._sums[k] / (stop - start)).astype(np.float32)
            vectors.append(truncate_matryoshka(l2_normalize(mean), dim, allowed_dims))
        return vectors

    def multi_vectors(self) -> list[np.ndarray]:
        return self._rows


class WindowSink:
    """One window's rows into a shared fold: row ``r`` is position ``offset + r``; rows before
    ``keep_from`` belong to the previous window's context and are dropped."""

    def __init__(self, fold: SpanFold, offset: int = 0, keep_from: int = 0) -> None:
        self.fold = fold
        self.offset = offset
        self.keep_from = keep_from
        self._fed: list[Partial] = []

    def feed(self, start: int, rows: np.ndarray) -> None:
        skip = max(0, self.keep_from - start)
        if skip < rows.shape[0]:
            self._fed.extend(self.fold.feed(self.offset + start + skip, rows[skip:]))

    def withdraw(self) -> None:
        """Take back everything this sink fed into the shared fold."""
        fed, self._fed = self._fed, []
        self.fold.withdraw(fed)
