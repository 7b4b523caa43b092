"""How a client's requests reach the engine: over HTTP to a router, or in-process.

A sender takes items and engine options and returns an :class:`EmbedResult`; the clients
above it only split, schedule and stack.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
import orjson

from jv4_vllm.client.retries import NO_RETRIES, Retries
from jv4_vllm.config import LimitsConfig
from jv4_vllm.core.engine import Engine
from jv4_vllm.core.pdf import PdfInput, RenderedPdf, plan_pdf, render_pdf
from jv4_vllm.core.scoring import (
    RerankHit,
    Scoring,
    ranking,
    rename_inputs,
    score_documents,
)
from jv4_vllm.core.types import EmbedOptions, EmbedResult, Item, OutputKind, TextInput
from jv4_vllm.core.wire import decode_embedding_item
from jv4_vllm.errors import (
    PDF_NOT_KEPT,
    BackendError,
    BackendTimeoutError,
    InvalidRequestError,
    Jv4Error,
    ServiceUnreachableError,
    error_from_response,
)

__all__ = ["EngineSender", "RouterSender", "Sender"]

Sender = Callable[[list[Item], EmbedOptions], Awaitable[EmbedResult]]
T = TypeVar("T")
EMBEDDINGS_PATH = "/v1/embeddings"
RERANK_PATH = "/v1/rerank"
_JSON = {"content-type": "application/json"}


class RouterSender:
    """Sends items to a jv4_vllm router's /v1/embeddings (base64 float32 on the wire).

    :meth:`body`, :meth:`post` and :meth:`result` are the three steps of a call, apart so a
    load generator can build bodies before its clock starts and count the bytes it moves.
    """

    def __init__(self, url: str, api_key: str | None, model: str, timeout: float,
                 *, http: httpx.AsyncClient | None = None, retries: Retries = NO_RETRIES) -> None:
        self._url = url.rstrip("/") + EMBEDDINGS_PATH
        self._rerank_url = url.rstrip("/") + RERANK_PATH
        self._headers = {"Authorization": f"Bearer {api_key}", **_JSON} if api_key else dict(_JSON)
        self._own_http = http is None
        self._http = http or httpx.AsyncClient(timeout=timeout)
        self._model = model
        self._retries = retries
        self._router_keeps_pdfs = True  # until a router refuses "keep"

    def body(self, items: list[Item], options: EmbedOptions) -> bytes:
        """The request body for ``items``: our task names, base64 answers."""
        return orjson.dumps(self._fields([_item_payload(item) for item in items], options))

    def _fields(self, inputs: list[dict[str, Any]], options: EmbedOptions) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self._model,
            "input": inputs,
            "task": f"{options.task}.{options.role}" if options.task != "text-matching" else options.task,
            "embedding_type": "base64",
            "return_multivector": options.output.multi,
            "truncate": options.truncate,
        }
        if options.dimensions is not None:
            body["dimensions"] = options.dimensions
        if options.late_chunking:
            body["late_chunking"] = True
        if options.output is OutputKind.BOTH:
            body["return_dense"] = True
        if options.pool_factor is not None:
            body["multivector_pool_factor"] = options.pool_factor
        return body

    async def post(self, body: bytes, url: str | None = None) -> httpx.Response:
        """POST one body (to /v1/embeddings unless ``url``); any failure raises a :mod:`jv4_vllm.errors` class.

        An error answer raises the class the router rendered (or, for a proxy's page, the one
        its status means); no answer in time is a BackendTimeoutError; no answer at all
        (refused, reset, DNS, TLS) is a ServiceUnreachableError. 429, 503 and connection
        failures are first tried again as the sender's :class:`Retries` allow.
        """
        return await self._retries.run(lambda: self._post_once(body, url or self._url))

    async def _post_once(self, body: bytes, target: str) -> httpx.Response:
        try:
            response = await self._http.post(target, content=body, headers=self._headers)
        except (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout) as exc:
            raise BackendTimeoutError(f"{target} did not answer in time ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise ServiceUnreachableError(f"cannot reach {target}: {type(exc).__name__}: {exc}") from exc
        if not response.is_success:
            raise error_from_response(response.status_code, response.content, response.headers.get("retry-after"))
        return response

    @staticmethod
    def result(response: httpx.Response) -> EmbedResult:
        """The embeddings of a successful answer, in input order."""
        return parse_answer(response, _embed_result)

    async def __call__(self, items: list[Item], options: EmbedOptions) -> EmbedResult:
        return self.result(await self.post(self.body(items, options)))

    async def embed_pdf(self, pdf: PdfInput, options: EmbedOptions, *, kept: bool = False) -> EmbedResult:
        """The vectors of one PDF's selected pages, in page order (the router renders them).

        The router is asked to keep the file; ``kept`` sends its ``sha256:`` reference instead
        of its bytes (for the later page batches of one PDF), and the bytes again if the router
        no longer holds it (evicted, or another router replica answered).
        """
        pages = {"pages": pdf.pages} if isinstance(pdf.pages, str) else {}
        if kept and self._router_keeps_pdfs:
            reference = "sha256:" + hashlib.sha256(pdf.data).hexdigest()
            try:
                return await self._pdf_call({"pdf": reference, **pages}, options)
            except InvalidRequestError as error:
                if error.code != PDF_NOT_KEPT:
                    raise
        item = {"pdf": base64.b64encode(pdf.data).decode("ascii"), **pages}
        try:
            return await self._pdf_call({**item, "keep": True}, options)
        except InvalidRequestError as error:
            if not (error.param or "").endswith(".keep"):  # a router older than keep refuses the field
                raise
            self._router_keeps_pdfs = False
        return await self._pdf_call(item, options)

    async def _pdf_call(self, item: dict[str, Any], options: EmbedOptions) -> EmbedResult:
        response = await self.post(orjson.dumps(self._fields([item], options)))
        return parse_answer(response, lambda payload: EmbedResult(
            embeddings=[decode_embedding_item(page) for page in payload["data"][0]["pages"]],
            prompt_tokens=int(payload.get("usage", {}).get("prompt_tokens", 0))))

    async def rerank(self, query: Item, documents: list[Item | PdfInput], *, task: str, scoring: Scoring,
                     truncate: bool, top_n: int | None, pool_factor: int | None = None) -> list[RerankHit]:
        """The router's /v1/rerank ranking, best first."""
        body: dict[str, Any] = {"model": self._model, "task": task, "query": _item_payload(query),
                                "documents": [_item_payload(d) for d in documents], "scoring": scoring,
                                "truncate": truncate, "return_documents": False}
        if top_n is not None:
            body["top_n"] = top_n
        if pool_factor is not None:
            body["multivector_pool_factor"] = pool_factor
        response = await self.post(orjson.dumps(body), self._rerank_url)
        return parse_answer(response, lambda payload: [
            RerankHit(int(r["index"]), float(r["relevance_score"]), r.get("page")) for r in payload["results"]])

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()


def _embed_result(payload: Any) -> EmbedResult:
    data = sorted(payload["data"], key=lambda e: e["index"])
    tokens = int(payload.get("usage", {}).get("prompt_tokens", 0))
    if data and "embeddings" in data[0] and "embedding" in data[0]:  # return_dense: both outputs
        return EmbedResult(embeddings=[decode_embedding_item({"embedding": e["embedding"]}) for e in data],
                           multivectors=[decode_embedding_item(e) for e in data], prompt_tokens=tokens)
    return EmbedResult(embeddings=[decode_embedding_item(entry) for entry in data], prompt_tokens=tokens)


def parse_answer(response: httpx.Response, build: Callable[[Any], T]) -> T:
    """``build`` applied to a successful answer's JSON; an answer without what it should hold is a BackendError."""
    try:
        return build(orjson.loads(response.content))
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as exc:
        start = " ".join(response.content[:200].decode("utf-8", "replace").split())
        raise BackendError(f"{response.url} answered {response.status_code} without the expected body "
                           f"({type(exc).__name__}): {start}") from None


def _item_payload(item: Item | PdfInput) -> dict[str, str]:
    if isinstance(item, TextInput):
        return {"text": item.text}
    if isinstance(item, PdfInput):
        pages = {"pages": item.pages} if isinstance(item.pages, str) else {}
        return {"pdf": base64.b64encode(item.data).decode("ascii"), **pages}
    return {"image": base64.b64encode(item.data).decode("ascii")}


async def _render(pdf: PdfInput, limits: LimitsConfig, index: int) -> RenderedPdf:
    plan = await asyncio.to_thread(plan_pdf, pdf.data, pdf.pages, limits, index)
    return await render_pdf(plan, limits)


class EngineSender:
    """Runs the engine in-process: nothing is uploaded, so ``kept`` changes nothing."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def __call__(self, items: list[Item], options: EmbedOptions) -> EmbedResult:
        return await self._engine.embed(items, options)

    async def embed_pdf(self, pdf: PdfInput, options: EmbedOptions, *, kept: bool = False) -> EmbedResult:
        """Pages rendered in-process at the config's ``render_dpi``, then embedded as images."""
        rendered = await _render(pdf, self._engine.config.limits, 0)
        return await self._engine.embed(list(rendered.images), options)

    async def rerank(self, query: Item, documents: list[Item | PdfInput], *, task: str, scoring: Scoring,
                     truncate: bool, top_n: int | None, pool_factor: int | None = None) -> list[RerankHit]:
        """The same scoring as the router's /v1/rerank, in-process."""
        limits = self._engine.config.limits
        ready: list[Item | RenderedPdf] = []
        for index, document in enumerate(documents):
            try:
                ready.append(await _render(document, limits, index) if isinstance(document, PdfInput) else document)
            except Jv4Error as error:
                raise rename_inputs(error, lambda i: f"documents[{i}]") from None
        scores = await score_documents(self._engine, query, ready, task=task, scoring=scoring, truncate=truncate,
                                       pool_factor=pool_factor)
        return [RerankHit(i, float(scores.scores[i]), scores.pages[i]) for i in ranking(scores.scores, top_n)]

    async def aclose(self) -> None:
        await self._engine.aclose()
