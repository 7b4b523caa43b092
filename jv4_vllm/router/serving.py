"""The work behind the routes: read a request's inputs, run the engine, render the response.

``/v1/embeddings``: :func:`request_items`, :func:`embed_items` (rendered by
:mod:`jv4_vllm.router.rendering`).
``/v1/rerank``: :func:`rerank` (the query and documents read, embedded once each, scored by
:func:`jv4_vllm.core.scoring.score_documents`, rendered best first).

:mod:`jv4_vllm.router.protocol` only declares and checks shapes; everything that does I/O
or bulk work lives here. Rendering hands numpy arrays to orjson (no per-float Python) and
runs in a worker thread, like every other bulk step, so the event loop stays free.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from jv4_vllm.config import LimitsConfig
from jv4_vllm.core.images import decode_image, fetch_image_url, has_url_scheme, read_image
from jv4_vllm.core.page_layout import PageLayout
from jv4_vllm.core.pdf import (
    PdfPlan,
    RenderedPdf,
    check_page_budget,
    fetch_pdf,
    is_pdf_url,
    plan_pdf,
    read_pdf_bytes,
    render_plan,
)
from jv4_vllm.core.scoring import DocumentScores, ranking, rename_inputs, score_documents
from jv4_vllm.core.types import EmbedOptions, EmbedResult, Item, TextInput
from jv4_vllm.errors import InvalidRequestError, Jv4Error, PayloadTooLargeError
from jv4_vllm.router.byte_budget import hold_more
from jv4_vllm.router.input_pools import InputPools
from jv4_vllm.router.kept_pdfs import KeptPdfs, is_reference
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

__all__ = ["RequestItems", "decode_gate", "embed_items", "large_response", "read_items", "request_items",
           "rerank"]

def decode_gate(limits: LimitsConfig) -> InputPools:
    """The router's input pools (URL fetches, image decodes, PDF renders), made once per app."""
    return InputPools(limits)


class RequestItems(list[Item]):
    """A request's engine items, each PDF input replaced by its page images in place;
    ``pages`` maps those inputs' indices to their page numbers (empty without PDFs)."""

    def __init__(self, items: Iterable[Item] = (), pages: dict[int, tuple[int, ...]] | None = None) -> None:
        super().__init__(items)
        self.pages = pages or {}
        self._owners: list[int] | None = None

    @property
    def layout(self) -> PageLayout:
        return PageLayout.of_flat(len(self), self.pages)

    def input_index(self, position: int) -> int:
        """The input the item at ``position`` came from (all of a PDF's pages come from one)."""
        if not self.pages:
            return position
        if self._owners is None:
            self._owners = self.layout.owners()
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


def large_response(result: EmbedResult) -> bool:
    """Small responses are rendered whole on the event loop (a thread hop costs more than they do);
    large ones are streamed, rendered chunk by chunk in worker threads, so a long document's
    response neither stalls the loop nor exists whole in memory."""
    values = sum(a.size for a in result.embeddings) + sum(a.size for a in result.multivectors or ())
    return values > INLINE_RENDER_VALUES


async def request_items(body: EmbeddingsRequest, limits: LimitsConfig, gate: InputPools,
                        kept: KeptPdfs | None = None, caller: str = "") -> RequestItems:
    """The inputs as engine items, images read and checked (``gate``: the router's input pools;
    ``kept``: PDFs kept for ``caller``); too many inputs is a 413."""
    raw = [body.input] if isinstance(body.input, str) else body.input
    if len(raw) > limits.max_inputs_per_request:
        raise PayloadTooLargeError(
            f"input has {len(raw)} items; the limit is {limits.max_inputs_per_request} per request",
            param="input", code="too_many_inputs")
    return await read_items(raw, limits, gate, kept, caller)


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
                     limits: LimitsConfig, gate: InputPools, kept: KeptPdfs | None = None,
                     caller: str = "") -> RequestItems:
    """Texts as they are; images and PDFs read concurrently, then PDF pages rendered.
    PDFs marked ``keep`` are kept in ``kept`` for ``caller``, and ``sha256:`` references read
    from it (without ``kept``, a reference is read as base64 and refused as such).
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
        try:
            if has_url_scheme(value):
                async with gate.fetches:
                    data = await fetch_image_url(value, limits, index)
                items[index] = image = await gate.decode(decode_image, data, limits, index)
            else:
                items[index] = image = await gate.decode(read_image, value, limits, index)
            hold_more(2 * len(image.data))  # the image, and its base64 copy in the /pooling call
        except Jv4Error as exc:
            failures[index] = exc

    async def plan(index: int, value: PdfObject) -> None:
        try:
            source = kept.get(caller, value.pdf, index) if kept and is_reference(value.pdf) else value.pdf
            if is_pdf_url(source):
                async with gate.fetches:
                    data = await fetch_pdf(source, limits, index)
            else:
                data = await gate.decode(read_pdf_bytes, source, limits, index)
            plans[index] = await gate.render(plan_pdf, data, value.pages, limits, index)
            if kept and value.keep:
                await asyncio.to_thread(kept.put, caller, plans[index].data)
        except Jv4Error as exc:
            failures[index] = exc

    await asyncio.gather(*(read(i, v) for i, v in images), *(plan(i, v) for i, v in pdfs))
    if failures:
        raise failures[min(failures)]
    if not plans:
        return RequestItems(items)  # type: ignore[arg-type]
    return await _with_pages(items, [plans[i] for i in sorted(plans)], limits, gate)


async def _with_pages(items: list[Item | None], plans: list[PdfPlan], limits: LimitsConfig,
                      gate: InputPools) -> RequestItems:
    """Every planned PDF rendered (within the request's page budget) and spliced in at its input."""
    check_page_budget(plans, limits)

    async def render(plan: PdfPlan) -> tuple[int, tuple[int, ...], tuple[Item, ...]]:
        cancel = threading.Event()
        rendered = await gate.render(render_plan, plan, limits, cancel, cancel=cancel)
        hold_more(2 * sum(len(image.data) for image in rendered.images))
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


# --- /v1/rerank -------------------------------------------------------------------------


def _documents(items: RequestItems, count: int) -> list[Item | RenderedPdf]:
    """Flat items back into documents: a PDF's page images regrouped as one document."""
    return [items[span.start] if span.pages is None else
            RenderedPdf(pages=span.pages, images=tuple(items[span.start:span.stop]))
            for span in PageLayout(count, items.pages).spans()]


async def _read_named(raw: list[Any], limits: LimitsConfig, gate: InputPools, field: str,
                      single: bool = False) -> RequestItems:
    try:
        return await read_items(raw, limits, gate)
    except Jv4Error as error:
        raise rename_inputs(error, lambda i: field if single else f"{field}[{i}]") from None


def _echo(document: Any) -> dict[str, Any]:
    return {"text": document} if isinstance(document, str) else document.model_dump(exclude_unset=True)


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
    return orjson.dumps({"id": f"rerank-{uuid.uuid4().hex}", "model": model, "usage": usage, "results": results})


async def rerank(body: RerankRequest, engine: Engine, limits: LimitsConfig, gate: InputPools,
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
