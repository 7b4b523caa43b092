"""``POST /v1/rerank`` (also ``/rerank``): jina-embeddings-v4's own late-interaction scores.

The request and response have the shape Jina, Cohere and vLLM share: ``{model, query,
documents, top_n, return_documents}`` -> ``{model, usage, results: [{index,
relevance_score, document?}]}``, best first. The query is a text or an image; documents are
texts, images or PDFs. ``scoring`` is ``maxsim`` (default: the query's multi-vector against
each document's, both with the task's projector) or ``dense`` (cosine of single vectors).
A PDF document is scored page by page and ranks as its best page, which the result names
(``page``). The task comes from ``model`` (``jina-embeddings-v4-code``) or ``task``
(default ``retrieval``); the query always gets the query role, documents the passage role.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.responses import Response

from jv4_vllm.config import LimitsConfig
from jv4_vllm.core.page_layout import PageLayout
from jv4_vllm.core.pdf import RenderedPdf
from jv4_vllm.core.scoring import (
    DocumentScores,
    ranking,
    rename_inputs,
    score_documents,
)
from jv4_vllm.core.types import Item, parse_task
from jv4_vllm.errors import (
    InvalidRequestError,
    Jv4Error,
    PayloadTooLargeError,
)
from jv4_vllm.router.admission import CLIENT_CLOSED_REQUEST, until_disconnect
from jv4_vllm.router.protocol import (
    InputItem,
    PdfObject,
    adapter_task,
    error_responses,
)
from jv4_vllm.router.serving import RequestItems, read_items

if TYPE_CHECKING:
    from jv4_vllm.core.engine import Engine

__all__ = ["RerankRequest", "RerankResponse", "RerankResult", "RerankUsage", "rerank", "routes"]

DEFAULT_TASK = "retrieval"
_RESPONSES = error_responses(
    s400="Invalid request: the message and param name the field, query or documents[i]",
    s413="Too many documents or PDF pages, or a document over the size limits")


class RerankRequest(BaseModel):
    """A query and documents to order by relevance."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = Field(
        None, description="The model name, or one adapter's name `<model>-<task>`; default: the model.")
    query: InputItem = Field(description='A string, {"text": ...} or an image ({"image": ...}).')
    documents: list[InputItem] = Field(
        description='Strings, {"text": ...}, {"image": ...} or {"pdf": ..., "pages": ...} objects (mixed lists '
                    "allowed). A PDF ranks as its best page.")
    top_n: StrictInt | None = Field(None, gt=0, description="Return only the best top_n results; default: all.")
    return_documents: StrictBool = Field(True, description="Echo each result's document as sent.")
    task: StrictStr | None = Field(
        None, description="retrieval (default), text-matching or code; roles are fixed (query / passage).")
    scoring: Literal["maxsim", "dense"] = Field(
        "maxsim", description="maxsim: late interaction over the task's multi-vectors; dense: cosine of "
                              "single vectors.")
    truncate: StrictBool = Field(False, description="Cut over-long texts to the model's maximum instead of failing.")

    def resolve_task(self, model_name: str, tasks: Sequence[str]) -> str:
        """The task from ``task`` and ``model`` (which may name one adapter)."""
        adapter = adapter_task(self.model, model_name, tasks)
        if self.task is None:
            return adapter or (DEFAULT_TASK if DEFAULT_TASK in tasks else tasks[0])
        if "." in self.task:
            raise InvalidRequestError(
                f"task {self.task!r}: rerank sets the roles itself (the query gets the query role, documents "
                "the passage role); send a bare task such as 'retrieval'", param="task")
        task, _ = parse_task(self.task, tasks)
        if adapter is not None and task != adapter:
            raise InvalidRequestError(f"task {self.task!r} contradicts model {self.model!r}", param="task")
        return task


class RerankResult(BaseModel):
    index: int = Field(description="Position of the document in the request.")
    relevance_score: float = Field(description="MaxSim (sum over query tokens) or cosine; higher is better.")
    page: int | None = Field(None, description="For a PDF document: the 1-based page that scored best.")
    document: dict[str, Any] | None = Field(None, description="The document as sent (return_documents).")


class RerankUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(BaseModel):
    id: str = Field(description="Identifies this answer (as Jina's, Cohere's and vLLM's rerank answers do).")
    model: str
    usage: RerankUsage
    results: list[RerankResult] = Field(description="Best first; top_n of them when top_n is given.")


# --- the service ------------------------------------------------------------------------


def _documents(items: RequestItems, count: int) -> list[Item | RenderedPdf]:
    """Flat items back into documents: a PDF's page images regrouped as one document."""
    return [items[span.start] if span.pages is None else
            RenderedPdf(pages=span.pages, images=tuple(items[span.start:span.stop]))
            for span in PageLayout(count, items.pages).spans()]


async def _read(raw: list[Any], limits: LimitsConfig, gate: asyncio.Semaphore, field: str,
                single: bool = False) -> RequestItems:
    try:
        return await read_items(raw, limits, gate)
    except Jv4Error as error:
        raise rename_inputs(error, lambda i: field if single else f"{field}[{i}]") from None


def _echo(document: Any) -> dict[str, Any]:
    return {"text": document} if isinstance(document, str) else document.model_dump(exclude_unset=True)


def _render(body: RerankRequest, model: str, scores: DocumentScores) -> bytes:
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


async def rerank(body: RerankRequest, engine: Engine, limits: LimitsConfig, gate: asyncio.Semaphore,
                 request: Request | None = None) -> bytes:
    """Check, read, embed once per input, score and render: the JSON body of the answer."""
    task = body.resolve_task(engine.model_name, engine.tasks)
    if request is not None:
        request.state.task = task
    if not body.documents:
        raise InvalidRequestError("documents is empty; send at least one document", param="documents")
    if len(body.documents) > limits.max_rerank_documents:
        raise PayloadTooLargeError(
            f"documents has {len(body.documents)} items; the limit is {limits.max_rerank_documents} per request",
            param="documents", code="too_many_documents")
    if isinstance(body.query, PdfObject):
        raise InvalidRequestError("the query must be a text or an image, not a PDF", param="query")
    query = await _read([body.query], limits, gate, "query", single=True)
    items = await _read(list(body.documents), limits, gate, "documents")
    documents = _documents(items, len(body.documents))
    scores = await score_documents(engine, query[0], documents, task=task, scoring=body.scoring,
                                   truncate=body.truncate)
    if request is not None:
        request.app.state.metrics.observe_embed(task, [query[0], *items], scores.prompt_tokens)
    return await asyncio.to_thread(_render, body, body.model or engine.model_name, scores)


# --- the route --------------------------------------------------------------------------

routes = APIRouter()


@routes.post("/v1/rerank", response_model=RerankResponse, responses=_RESPONSES,
             summary="Rerank documents (texts, images, PDF pages) against a query")
@routes.post("/rerank", response_model=RerankResponse, responses=_RESPONSES, include_in_schema=False)
async def create_rerank(body: RerankRequest, request: Request) -> Response:
    """MaxSim (default) or dense scores of every document against the query, best first."""
    state = request.app.state
    finished, content = await until_disconnect(
        request, rerank(body, state.engine, state.config.limits, state.decode_gate, request))
    if not finished:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return Response(content, media_type="application/json")
