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

from jv4_vllm.core.pdf import RenderedPdf
from jv4_vllm.core.pooling import EPS
from jv4_vllm.core.types import EmbedOptions, EmbedResult, Item, OutputKind, Role
from jv4_vllm.errors import Jv4Error

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
    "ranking",
    "rename_inputs",
    "score_documents",
]

Scoring = Literal["maxsim", "dense"]
# Similarity blocks are bounded in size: an image query (hundreds of rows) against a thousand
# page images would otherwise be a matrix of hundreds of millions of floats.
_BLOCK_ELEMENTS = 1 << 22


def _rows(matrix: np.ndarray, name: str) -> np.ndarray:
    rows = np.asarray(matrix, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [rows, dim] matrix, got shape {rows.shape}")
    return rows


def maxsim(query_rows: np.ndarray, doc_rows: np.ndarray) -> float:
    """Sum over the query's rows of the best dot product with any of the document's rows."""
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
                          task: str, scoring: Scoring = "maxsim", truncate: bool = False) -> DocumentScores:
    """Embed the query (query role) and every document or page (passage role) once, then score.

    Errors name ``query`` and ``documents[i]`` rather than engine input positions.
    """
    flat: list[Item] = []
    owners: list[int] = []
    for index, document in enumerate(documents):
        parts = document.images if isinstance(document, RenderedPdf) else (document,)
        flat.extend(parts)
        owners.extend([index] * len(parts))
    output = OutputKind.MULTI if scoring == "maxsim" else OutputKind.SINGLE
    options = EmbedOptions(task=task, role="query", output=output, truncate=truncate)

    async def embed(items: list[Item], role: Role, name: Callable[[int], str]) -> EmbedResult:
        try:
            return await engine.embed(items, replace(options, role=role))
        except Jv4Error as error:
            raise rename_inputs(error, name) from None

    try:
        async with asyncio.TaskGroup() as group:  # one failure cancels the other pass
            query_job = group.create_task(embed([query], "query", lambda _: "query"))
            docs_job = group.create_task(embed(flat, "passage", lambda i: f"documents[{owners[i]}]"))
    except ExceptionGroup as failure:
        raise failure.exceptions[0] from None
    query_result, docs_result = query_job.result(), docs_job.result()
    flat_scores = await asyncio.to_thread(_score, query_result.embeddings[0], docs_result.embeddings, scoring)
    scores = np.full(len(documents), -np.inf, dtype=np.float64)
    pages: list[int | None] = [None] * len(documents)
    position = 0
    for index, document in enumerate(documents):
        if isinstance(document, RenderedPdf):
            page_scores = flat_scores[position:position + len(document.pages)]
            best = int(np.argmax(page_scores))
            scores[index], pages[index] = float(page_scores[best]), document.pages[best]
            position += len(document.pages)
        else:
            scores[index] = float(flat_scores[position])
            position += 1
    return DocumentScores(scores=scores, pages=pages,
                          prompt_tokens=query_result.prompt_tokens + docs_result.prompt_tokens)
