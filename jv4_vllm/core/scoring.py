"""Scoring a query against documents: late interaction (MaxSim) or dense cosine.

jina-embeddings-v4's multi-vectors are the task's projector applied to every token, each row
L2-normalised (what :meth:`Engine.embed` returns with ``multivector``), so
``maxsim(q, d) = sum over q's rows of the best dot product with any row of d``, the score of
the model card and of vector stores' MAX_SIM comparators. vLLM's own ``/rerank`` would MaxSim
raw hidden states without the projector, which are not this model's scores.

:func:`score_documents` is the one scoring pass shared by the router's ``/v1/rerank`` and the
in-process client: the query once with the query role, the documents once with the passage
role, numpy scoring in a worker thread. A PDF document scores as its best page.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from jv4_vllm.core.concurrency import all_or_first_error
from jv4_vllm.core.page_layout import PageLayout
from jv4_vllm.core.pdf import RenderedPdf
from jv4_vllm.core.pooling import EPS
from jv4_vllm.core.types import EmbedOptions, EmbedResult, Item, OutputKind, Role
from jv4_vllm.errors import InvalidRequestError, Jv4Error

if TYPE_CHECKING:
    from jv4_vllm.core.engine import Engine

__all__ = [
    "DocumentScores",
    "RerankHit",
    "Scoring",
    "cosine",
    "cosine_scores",
    "maxsim",
    "maxsim_scores",
    "packed_bits",
    "ranking",
    "rename_inputs",
    "score_documents",
]

Scoring = Literal["maxsim", "dense"]
# Similarity blocks are bounded in size: an image query (hundreds of rows) against a thousand
# page images would otherwise be a matrix of hundreds of millions of floats.
_BLOCK_ELEMENTS = 1 << 22
_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1)  # set bits per byte


def _rows(matrix: np.ndarray, name: str) -> np.ndarray:
    rows = np.asarray(matrix, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [rows, dim] matrix, got shape {rows.shape}")
    return rows


def packed_bits(rows: np.ndarray) -> np.ndarray | None:
    """Packed sign bits as uint8 (``ubinary`` as it is; ``binary``, int8, plus 128), or None for float rows."""
    array = np.asarray(rows)
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.int8:
        return (array.astype(np.int16) + 128).astype(np.uint8)
    return None


def _hamming_maxsim(query_rows: np.ndarray, doc_bits: np.ndarray) -> float:
    doc = np.atleast_2d(doc_bits)
    query = packed_bits(query_rows)
    if query is None:  # a float query is binarised as the service packs rows: bit set where the value > 0
        query = np.packbits(_rows(query_rows, "query_rows") > 0, axis=-1)
    query = np.atleast_2d(query)
    if doc.shape[0] == 0 or query.shape[0] == 0 or query.shape[1] != doc.shape[1]:
        raise ValueError(f"query bits {query.shape} and document bits {doc.shape} do not match")
    bits = doc.shape[1] * 8
    best = np.full(query.shape[0], bits, dtype=np.int64)
    step = max(1, _BLOCK_ELEMENTS // max(1, query.shape[0] * doc.shape[1]))
    for start in range(0, doc.shape[0], step):
        distances = _POPCOUNT[query[:, None, :] ^ doc[None, start:start + step, :]].sum(axis=2, dtype=np.int64)
        np.minimum(best, distances.min(axis=1), out=best)
    return float((1.0 - 2.0 * best / bits).sum(dtype=np.float64))


def maxsim(query_rows: np.ndarray, doc_rows: np.ndarray) -> float:
    """Sum over the query's rows of the best dot product with any of the document's rows.

    Packed binary documents (``embedding_type`` ``binary`` as int8 or ``ubinary`` as uint8,
    [rows, P/8]) are scored by Hamming similarity, as Vespa ranks binary ColPali rows: a
    query row's best match is the document row with the fewest differing sign bits ``h``, and
    it adds ``1 - 2h/P`` (the dot product of the two rows' ±1 sign vectors over P). A float
    query is binarised first (bit set where the value is > 0); a packed query is used as is.
    """
    bits = packed_bits(doc_rows)
    if bits is not None:
        return _hamming_maxsim(query_rows, bits)
    query, doc = _rows(query_rows, "query_rows"), _rows(doc_rows, "doc_rows")
    if query.shape[1] != doc.shape[1]:
        raise ValueError(f"query rows are {query.shape[1]}-d but document rows are {doc.shape[1]}-d")
    return float((query @ doc.T).max(axis=1).sum(dtype=np.float64))


def maxsim_scores(query_rows: np.ndarray, documents: Sequence[np.ndarray]) -> np.ndarray:
    """:func:`maxsim` of one query against many documents, vectorised in bounded blocks."""
    query = _rows(query_rows, "query_rows")
    scores = np.empty(len(documents), dtype=np.float64)
    start = 0
    while start < len(documents):
        stop, rows = start, 0
        while stop < len(documents) and (stop == start or (rows + len(documents[stop])) * len(query) <= _BLOCK_ELEMENTS):
            rows += len(documents[stop])
            stop += 1
        block = [_rows(doc, f"documents[{i}]") for i, doc in enumerate(documents[start:stop], start)]
        offsets = np.cumsum([0] + [len(doc) for doc in block[:-1]])
        sims = query @ np.concatenate(block).T  # [query rows, block rows]
        scores[start:stop] = np.maximum.reduceat(sims, offsets, axis=1).sum(axis=0, dtype=np.float64)
        start = stop
    return scores


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors."""
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    return float(a @ b / max(float(np.linalg.norm(a) * np.linalg.norm(b)), EPS))


def cosine_scores(query: np.ndarray, documents: Sequence[np.ndarray]) -> np.ndarray:
    """:func:`cosine` of one vector against many."""
    if not len(documents):
        return np.empty(0, dtype=np.float64)
    matrix = np.stack([np.asarray(d, dtype=np.float32) for d in documents])
    q = np.asarray(query, dtype=np.float32)
    norms = np.maximum(np.linalg.norm(matrix, axis=1) * np.linalg.norm(q), EPS)
    return (matrix @ q / norms).astype(np.float64)


def ranking(scores: np.ndarray | Sequence[float], top_n: int | None = None) -> list[int]:
    """Indices best first (ties: lower index first), cut to ``top_n``."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return [int(i) for i in order[:top_n]]


def rename_inputs(error: Jv4Error, name: Callable[[int], str]) -> Jv4Error:
    """Name the inputs an error is about (its :attr:`~jv4_vllm.errors.Jv4Error.inputs`, engine
    positions) as ``name(i)``, e.g. ``documents[2]``; its text is left as it is."""
    return error.relabel(name)


@dataclass(slots=True)
class DocumentScores:
    """One score per document; for a PDF document, the page that scored best."""

    scores: np.ndarray
    pages: list[int | None]
    prompt_tokens: int


@dataclass(slots=True)
class RerankHit:
    """One ranked document: its position in the request, its score, its best page (PDFs)."""

    index: int
    relevance_score: float
    page: int | None = None
    document: Any = None


def _score(query: np.ndarray, documents: list[np.ndarray], scoring: Scoring) -> np.ndarray:
    return maxsim_scores(query, documents) if scoring == "maxsim" else cosine_scores(query, documents)


async def score_documents(engine: Engine, query: Item, documents: Sequence[Item | RenderedPdf], *,
                          task: str, scoring: Scoring = "maxsim", truncate: bool = False,
                          pool_factor: int | None = None) -> DocumentScores:
    """Embed the query (query role) and every document or page (passage role) once, then score.

    ``pool_factor`` pools the documents' multi-vectors (None: the engine's default); the query
    keeps every row, as the token-pooling papers score. Errors name ``query`` and
    ``documents[i]`` rather than engine input positions.
    """
    if pool_factor is not None and scoring != "maxsim":
        raise InvalidRequestError("the documents' pool factor applies to maxsim scoring only",
                                  param="multivector_pool_factor")
    layout = PageLayout(len(documents), {i: d.pages for i, d in enumerate(documents) if isinstance(d, RenderedPdf)})
    flat = [part for d in documents for part in (d.images if isinstance(d, RenderedPdf) else (d,))]
    owners = layout.owners()
    output = OutputKind.MULTI if scoring == "maxsim" else OutputKind.SINGLE
    options = EmbedOptions(task=task, role="query", output=output, truncate=truncate)

    async def embed(items: list[Item], role: Role, name: Callable[[int], str]) -> EmbedResult:
        factor = (1 if role == "query" else pool_factor) if output is OutputKind.MULTI else None
        try:
            return await engine.embed(items, replace(options, role=role, pool_factor=factor))
        except Jv4Error as error:
            raise rename_inputs(error, name) from None

    query_result, docs_result = await all_or_first_error([  # one failure cancels the other pass
        embed([query], "query", lambda _: "query"),
        embed(flat, "passage", lambda i: f"documents[{owners[i]}]")])
    flat_scores = await asyncio.to_thread(_score, query_result.embeddings[0], docs_result.embeddings, scoring)
    scores = np.full(len(documents), -np.inf, dtype=np.float64)
    pages: list[int | None] = [None] * len(documents)
    for span in layout.spans():  # a PDF scores as its best page
        best = span.start + int(np.argmax(flat_scores[span.start:span.stop]))
        scores[span.index] = float(flat_scores[best])
        pages[span.index] = None if span.pages is None else span.pages[best - span.start]
    return DocumentScores(scores=scores, pages=pages,
                          prompt_tokens=query_result.prompt_tokens + docs_result.prompt_tokens)
