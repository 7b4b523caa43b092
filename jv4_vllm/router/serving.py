"""The work behind the routes: read a request's inputs, run the engine, render the response.

``/v1/embeddings``: :func:`request_items`, :func:`embed_items`, :func:`render_embeddings`.
``/v1/rerank``: :func:`rerank` (the query and documents read, embedded once each, scored by
:func:`jv4_vllm.core.scoring.score_documents`, rendered best first).

:mod:`jv4_vllm.router.protocol` only declares and checks shapes; everything that does I/O
or bulk work lives here. Rendering hands numpy arrays to orjson (no per-float Python) and
runs in a worker thread, like every other bulk step, so the event loop stays free.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from jv4_vllm.config import LimitsConfig
from jv4_vllm.core.images import load_image
from jv4_vllm.core.pdf import (
    PdfPlan,
    RenderedPdf,
    check_page_budget,
    load_pdf,
    render_pdf,
)
from jv4_vllm.core.scoring import (
    DocumentScores,
    ranking,
    rename_inputs,
    score_documents,
)
from jv4_vllm.core.types import EmbedOptions, EmbedResult, Item, OutputKind, TextInput
from jv4_vllm.core.wire import EmbeddingType, encode_multivector, encode_vector
from jv4_vllm.errors import InvalidRequestError, Jv4Error, PayloadTooLargeError
from jv4_vllm.router.protocol import (
    BytesObject,
    EmbeddingsRequest,
    ImageObject,
    PdfObject,
    RerankRequest,
    TextObject,
    UrlObject,
)

if TYPE_CHECKING:
    from jv4_vllm.core.engine import Engine

__all__ = ["RequestItems", "decode_gate", "embed_items", "off_loop_if_large", "read_items", "render_embeddings",
           "request_items", "rerank"]

IMAGE_DECODE_CONCURRENCY = 4  # image decodes at once in the whole router (they share the CPU with pooling)


def decode_gate() -> asyncio.Semaphore:
    """The router's one cap on concurrent image reads and decodes, made once per app."""
    return asyncio.Semaphore(IMAGE_DECODE_CONCURRENCY)


class RequestItems(list[Item]):
    """A request's engine items, each PDF input replaced by its page images in place;
    ``pages`` maps those inputs' indices to their page numbers (empty without PDFs)."""

    def __init__(self, items: Iterable[Item] = (), pages: dict[int, tuple[int, ...]] | None = None) -> None:
        super().__init__(items)
        self.pages = pages or {}
        self._owners: list[int] | None = None

    def input_index(self, position: int) -> int:
        """The input the item at ``position`` came from (all of a PDF's pages come from one)."""
        if not self.pages:
            return position
        if self._owners is None:
            owners: list[int] = []
            index = 0
            while len(owners) < len(self):
                owners.extend([index] * len(self.pages.get(index, (None,))))
                index += 1
            self._owners = owners
        return self._owners[position] if position < len(self._owners) else position


async def embed_items(engine: Engine, items: RequestItems, options: EmbedOptions) -> EmbedResult:
    """``engine.embed``, its errors naming the request's inputs rather than engine positions."""
    try:
        return await engine.embed(items, options)
    except Jv4Error as error:
        if items.pages:
            rename_inputs(error, lambda position: f"input[{items.input_index(position)}]")
        raise


INLINE_RENDER_VALUES = 65_536  # responses with more floats than this are rendered in a worker thread


async def off_loop_if_large(render: Callable[[], bytes], result: EmbedResult) -> bytes:
    """Render small responses on the event loop (a thread hop costs more than they do), large ones
    in a worker thread so a long document's response never stalls the loop."""
    values = sum(a.size for a in result.embeddings) + sum(a.size for a in result.multivectors or ())
    return await asyncio.to_thread(render) if values > INLINE_RENDER_VALUES else render()


async def request_items(body: EmbeddingsRequest, limits: LimitsConfig, gate: asyncio.Semaphore) -> RequestItems:
    """The inputs as engine items, images read and checked (``gate``: the router-wide decode cap);
    too many inputs is a 413."""
    raw = [body.input] if isinstance(body.input, str) else body.input
    if len(raw) > limits.max_inputs_per_request:
        raise PayloadTooLargeError(
            f"input has {len(raw)} items; the limit is {limits.max_inputs_per_request} per request",
            param="input", code="too_many_inputs")
    return await read_items(raw, limits, gate)


def _image_source(value: object) -> str | None:
    """The image string of an image item in any of its spellings; None for texts."""
    if isinstance(value, ImageObject):
        return value.image
    if isinstance(value, UrlObject):
        return value.url
    if isinstance(value, BytesObject):
        return value.bytes
    return None


async def read_items(raw: Sequence[str | TextObject | ImageObject | UrlObject | BytesObject | PdfObject],
                     limits: LimitsConfig, gate: asyncio.Semaphore) -> RequestItems:
    """Texts as they are; images and PDFs read concurrently, then PDF pages rendered.
    A failure reports the lowest failing index."""
    sources = [_image_source(value) for value in raw]
    items: list[Item | None] = [
        None if source is not None or isinstance(value, PdfObject)
        else TextInput(value if isinstance(value, str) else value.text)  # type: ignore[union-attr]
        for value, source in zip(raw, sources)
    ]
    images = [(i, source) for i, source in enumerate(sources) if source is not None]
    pdfs = [(i, value) for i, value in enumerate(raw) if isinstance(value, PdfObject)]
    if not images and not pdfs:
        return RequestItems(items)  # type: ignore[arg-type]
    failures: dict[int, Jv4Error] = {}
    plans: dict[int, PdfPlan] = {}

    async def read(index: int, value: str) -> None:
        async with gate:
            try:
                items[index] = await load_image(value, limits, index)
            except Jv4Error as exc:
                failures[index] = exc

    async def plan(index: int, value: PdfObject) -> None:
        async with gate:
            try:
                plans[index] = await load_pdf(value.pdf, value.pages, limits, index)
            except Jv4Error as exc:
                failures[index] = exc

    await asyncio.gather(*(read(i, v) for i, v in images), *(plan(i, v) for i, v in pdfs))
    if failures:
        raise failures[min(failures)]
    if not plans:
        return RequestItems(items)  # type: ignore[arg-type]
    return await _with_pages(items, [plans[i] for i in sorted(plans)], limits, gate)


async def _with_pages(items: list[Item | None], plans: list[PdfPlan], limits: LimitsConfig,
                      gate: asyncio.Semaphore) -> RequestItems:
    """Every planned PDF rendered (within the request's page budget) and spliced in at its input."""
    check_page_budget(plans, limits)

    async def render(plan: PdfPlan) -> tuple[int, tuple[int, ...], tuple[Item, ...]]:
        async with gate:
            rendered = await render_pdf(plan, limits)
        return plan.index, rendered.pages, rendered.images

    done = {index: (pages, images) for index, pages, images in
            await asyncio.gather(*(render(plan) for plan in plans))}
    flat: list[Item] = []
    for index, item in enumerate(items):
        if index in done:
            flat.extend(done[index][1])
        else:
            flat.append(item)  # type: ignore[arg-type]
    return RequestItems(flat, {index: pages for index, (pages, _) in done.items()})


def render_embeddings(result: EmbedResult, *, model: str, embedding_type: EmbeddingType,
                      output: OutputKind, pages: Mapping[int, Sequence[int]] | None = None) -> bytes:
    """The JSON body for ``result`` (CPU-bound: call it from a worker thread).

    ``pages`` (:attr:`RequestItems.pages`) groups the page vectors of each PDF input into one
    ``{"object": "pages", "index", "pages": [{"page", ...}]}`` item, so ``data[i]`` answers ``input[i]``.
    """
    item, arrays = (_multivector_item if output is OutputKind.MULTI else _vector_item), result.embeddings
    if output is OutputKind.BOTH:  # dense and multi-vector from one pass
        item, arrays = _both_item, list(zip(result.multivectors or (), result.embeddings))  # type: ignore[assignment]
    if pages:
        data = _grouped(arrays, pages, item, embedding_type)
    else:
        data = [item(index, array, embedding_type) for index, array in enumerate(arrays)]
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return orjson.dumps({"object": "list", "model": model, "data": data, "usage": usage},
                        option=orjson.OPT_SERIALIZE_NUMPY)


def _grouped(arrays: Sequence[np.ndarray], pages: Mapping[int, Sequence[int]],
             item: Callable[[int, np.ndarray, EmbeddingType], dict[str, Any]],
             embedding_type: EmbeddingType) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = []
    position, index = 0, 0
    while position < len(arrays):
        if index in pages:
            entries = []
            for number in pages[index]:
                fields = item(index, arrays[position], embedding_type)
                del fields["index"]
                entries.append({"page": number, **fields})
                position += 1
            data.append({"object": "pages", "index": index, "pages": entries})
        else:
            data.append(item(index, arrays[position], embedding_type))
            position += 1
        index += 1
    return data


def _vector_item(index: int, vector: np.ndarray, embedding_type: EmbeddingType) -> dict[str, Any]:
    embedding = (np.ascontiguousarray(vector, dtype=np.float32) if embedding_type == "float"
                 else encode_vector(vector, embedding_type))
    return {"object": "embedding", "index": index, "embedding": embedding}


def _multivector_item(index: int, matrix: np.ndarray, embedding_type: EmbeddingType) -> dict[str, Any]:
    fields = ({"embeddings": np.ascontiguousarray(matrix, dtype=np.float32)} if embedding_type == "float"
              else encode_multivector(matrix, embedding_type))
    return {"object": "embeddings", "index": index, **fields}


def _both_item(index: int, pair: tuple[np.ndarray, np.ndarray], embedding_type: EmbeddingType) -> dict[str, Any]:
    """A multi-vector item that also carries the input's single vector as ``embedding``."""
    matrix, vector = pair
    return {**_multivector_item(index, matrix, embedding_type),
            "embedding": _vector_item(index, vector, embedding_type)["embedding"]}


# --- /v1/rerank -------------------------------------------------------------------------


def _documents(items: RequestItems, count: int) -> list[Item | RenderedPdf]:
    """Flat items back into documents: a PDF's page images regrouped as one document."""
    documents: list[Item | RenderedPdf] = []
    position = 0
    for index in range(count):
        pages = items.pages.get(index)
        if pages is None:
            documents.append(items[position])
            position += 1
        else:
            documents.append(RenderedPdf(pages=tuple(pages), images=tuple(items[position:position + len(pages)])))
            position += len(pages)
    return documents


async def _read_named(raw: list[Any], limits: LimitsConfig, gate: asyncio.Semaphore, field: str,
                      single: bool = False) -> RequestItems:
    try:
        return await read_items(raw, limits, gate)
    except Jv4Error as error:
        raise rename_inputs(error, lambda i: field if single else f"{field}[{i}]") from None


def _echo(document: Any) -> dict[str, Any]:
    return {"text": document} if isinstance(document, str) else document.model_dump(exclude_none=True)


def _render_ranking(body: RerankRequest, model: str, scores: DocumentScores) -> bytes:
    results = []
    for index in ranking(scores.scores, body.top_n):
        result: dict[str, Any] = {"index": index, "relevance_score": float(scores.scores[index])}
        if scores.pages[index] is not None:
            result["page"] = scores.pages[index]
        if body.return_documents:
            result["document"] = _echo(body.documents[index])
        results.append(result)
    usage = {"prompt_tokens": scores.prompt_tokens, "total_tokens": scores.prompt_tokens}
    return orjson.dumps({"model": model, "usage": usage, "results": results})


async def rerank(body: RerankRequest, engine: Engine, limits: LimitsConfig, gate: asyncio.Semaphore,
                 on_task: Callable[[str], None] | None = None) -> tuple[bytes, list[Item], int]:
    """Check, read, embed once per input, score and render: the JSON body of the answer, with
    the items embedded and the prompt tokens used (for the metrics). ``on_task`` hears the task
    as soon as it is known."""
    task = body.resolve_task(engine.model_name, engine.tasks)
    if on_task is not None:
        on_task(task)
    if not body.documents:
        raise InvalidRequestError("documents is empty; send at least one document", param="documents")
    if len(body.documents) > limits.max_rerank_documents:
        raise PayloadTooLargeError(
            f"documents has {len(body.documents)} items; the limit is {limits.max_rerank_documents} per request",
            param="documents", code="too_many_documents")
    if isinstance(body.query, PdfObject):
        raise InvalidRequestError("the query must be a text or an image, not a PDF", param="query")
    query = await _read_named([body.query], limits, gate, "query", single=True)
    items = await _read_named(list(body.documents), limits, gate, "documents")
    documents = _documents(items, len(body.documents))
    scores = await score_documents(engine, query[0], documents, task=task, scoring=body.scoring,
                                   truncate=body.truncate, pool_factor=body.multivector_pool_factor)
    content = await asyncio.to_thread(_render_ranking, body, body.model or engine.model_name, scores)
    return content, [query[0], *items], scores.prompt_tokens
