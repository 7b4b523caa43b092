"""The async client: ``AsyncClient(router_url)`` or ``await AsyncClient.direct(config)``.

Both return numpy arrays: [N, d] for single vectors, a list of [n_i, P] arrays for
multi-vectors (never a ragged stack). Large inputs are split into requests of
``batch_size`` sent concurrently, with a progress bar for long jobs.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, overload

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from jv4_vllm.client.fetch import fetch_own_url, is_http_url
from jv4_vllm.client.retries import DEFAULT_RETRIES, Retries
from jv4_vllm.client.senders import EngineSender, RouterSender
from jv4_vllm.config import Config, LimitsConfig, load_config
from jv4_vllm.core.concurrency import all_or_first_error
from jv4_vllm.core.engine import Engine
from jv4_vllm.core.image_rules import model_image_limits
from jv4_vllm.core.images import ImageSource, load_image
from jv4_vllm.core.pdf import (
    PageSelection,
    PdfInput,
    PdfPlan,
    PdfSource,
    format_pages,
    load_pdf,
)
from jv4_vllm.core.scoring import RerankHit, Scoring, rename_inputs
from jv4_vllm.core.types import (
    TASK_NAMES,
    EmbedOptions,
    EmbedResult,
    ImageInput,
    Item,
    OutputKind,
    Role,
    TextInput,
    parse_task,
)
from jv4_vllm.errors import InvalidRequestError, Jv4Error

__all__ = ["AsyncClient", "DenseAndMulti", "Embeddings", "RerankHit", "Retries"]

PROGRESS_MIN_BATCHES = 4  # show a bar by default once a job spans this many requests
Embeddings = np.ndarray | list[np.ndarray]


class DenseAndMulti(NamedTuple):
    """Both outputs of one pass (``return_multivector=True, return_dense=True``): single vectors
    [N, d] (one [d] vector for a single input) and one [n_i, P] multi-vector per input."""

    dense: np.ndarray
    multi: list[np.ndarray] | np.ndarray


def _one(result: Embeddings | DenseAndMulti) -> np.ndarray | DenseAndMulti:
    """The only input's result out of a batch of one."""
    if isinstance(result, DenseAndMulti):
        return DenseAndMulti(result.dense[0], result.multi[0])
    return result[0]


UNLIMITED_PAGES = 1 << 30  # the client splits a PDF into requests; each request meets the server's limit


def _options(task: str, prompt_name: str, truncate_dim: int | None, return_multivector: bool,
             truncate: bool, *, return_dense: bool = False, late_chunking: bool = False,
             pool_factor: int | None = None) -> EmbedOptions:
    name, role = parse_task(task if "." in task else f"{task}.{prompt_name}", TASK_NAMES)
    if return_multivector and truncate_dim is not None and not return_dense:
        raise InvalidRequestError("truncate_dim cannot be combined with return_multivector (unless return_dense: "
                                  "then it applies to the single vectors)", param="truncate_dim")
    if pool_factor is not None and (isinstance(pool_factor, bool) or not isinstance(pool_factor, int)
                                    or pool_factor < 1 or not return_multivector):
        raise InvalidRequestError("pool_factor must be an int of at least 1, with return_multivector=True",
                                  param="pool_factor")
    return EmbedOptions(task=name, role=role, dimensions=truncate_dim,
                        output=OutputKind.of(return_multivector, return_dense), truncate=truncate,
                        late_chunking=late_chunking, pool_factor=pool_factor)


class AsyncClient:
    """Async client. ``AsyncClient(url)`` talks to a router; ``await AsyncClient.direct(config)`` runs the engine.

    ``retries`` bounds how 429/503 answers (after their ``Retry-After``) and failed connections
    (after a backoff) are tried again; see :class:`~jv4_vllm.client.retries.Retries`.
    """

    def __init__(self, url: str, *, api_key: str | None = None, model: str = "jina-embeddings-v4",
                 timeout: float = 300.0, max_concurrency: int = 4, retries: Retries = DEFAULT_RETRIES) -> None:
        if not isinstance(url, str) or not url.strip():
            raise ValueError(f"give the router URL (such as 'http://127.0.0.1:8080'), not {url!r}; to embed "
                             "without a router use Client.direct(config) or AsyncClient.direct(config)")
        self._setup(RouterSender(url, api_key, model, timeout, retries=retries), LimitsConfig(allow_image_urls=True),
                    max_concurrency)

    def _setup(self, sender: RouterSender | EngineSender, limits: LimitsConfig, max_concurrency: int) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self._sender = sender
        self._max_concurrency = max_concurrency
        # The caller's own files and URLs: paths are read and http(s) URLs fetched for the caller
        # (client/fetch.py: no server-side address guard); size and pixel caps still apply.
        self._image_limits = limits

    @classmethod
    async def direct(cls, config: Config | str | Path, *, max_concurrency: int = 4) -> AsyncClient:
        """Embed in-process through the deployments listed in ``config`` (no router)."""
        cfg = config if isinstance(config, Config) else load_config(config)
        client = cls.__new__(cls)
        client._setup(EngineSender(await Engine.start(cfg)),
                      model_image_limits(cfg).model_copy(update={"allow_image_urls": True}), max_concurrency)
        return client

    async def aclose(self) -> None:
        await self._sender.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @overload
    async def encode_text(self, texts: str | Sequence[str], *, task: str = ..., prompt_name: Role = ...,
                          truncate_dim: int | None = ..., return_multivector: Literal[False] = ...,
                          return_dense: bool = ..., batch_size: int = ..., show_progress: bool | None = ...,
                          truncate: bool = ..., late_chunking: bool = ...,
                          pool_factor: int | None = ...) -> np.ndarray: ...
    @overload
    async def encode_text(self, texts: str, *, task: str = ..., prompt_name: Role = ...,
                          truncate_dim: None = ..., return_multivector: Literal[True],
                          return_dense: Literal[False] = ..., batch_size: int = ...,
                          show_progress: bool | None = ..., truncate: bool = ...,
                          late_chunking: bool = ..., pool_factor: int | None = ...) -> np.ndarray: ...
    @overload
    async def encode_text(self, texts: Sequence[str], *, task: str = ..., prompt_name: Role = ...,
                          truncate_dim: None = ..., return_multivector: Literal[True],
                          return_dense: Literal[False] = ..., batch_size: int = ...,
                          show_progress: bool | None = ..., truncate: bool = ...,
                          late_chunking: bool = ..., pool_factor: int | None = ...) -> list[np.ndarray]: ...
    @overload
    async def encode_text(self, texts: str | Sequence[str], *, task: str = ..., prompt_name: Role = ...,
                          truncate_dim: int | None = ..., return_multivector: Literal[True],
                          return_dense: Literal[True], batch_size: int = ..., show_progress: bool | None = ...,
                          truncate: bool = ..., late_chunking: bool = ...,
                          pool_factor: int | None = ...) -> DenseAndMulti: ...
    @overload
    async def encode_text(self, texts: str | Sequence[str], *, task: str = ..., prompt_name: Role = ...,
                          truncate_dim: int | None = ..., return_multivector: bool = ..., return_dense: bool = ...,
                          batch_size: int = ..., show_progress: bool | None = ..., truncate: bool = ...,
                          late_chunking: bool = ..., pool_factor: int | None = ...) -> Embeddings | DenseAndMulti: ...

    async def encode_text(self, texts: str | Sequence[str], *, task: str = "retrieval", prompt_name: Role = "query",
                          truncate_dim: int | None = None, return_multivector: bool = False,
                          return_dense: bool = False, batch_size: int = 32, show_progress: bool | None = None,
                          truncate: bool = False, late_chunking: bool = False,
                          pool_factor: int | None = None) -> Embeddings | DenseAndMulti:
        """Embed texts; a single string gives a single vector (or one multi-vector).

        ``task`` defaults to ``retrieval`` with the query role, as the reference ``encode_text``
        does (the HTTP API's default is ``text-matching``); ``prompt_name`` (``query`` or
        ``passage``) is the role, or write it in ``task`` (``"retrieval.passage"``).
        [N, d] single vectors (one [d] vector for one string); with ``return_multivector`` one
        [n_tokens, P] matrix per text; with ``return_dense`` too, both as :class:`DenseAndMulti`.
        ``pool_factor`` (with ``return_multivector``): hierarchical token pooling, about
        1/factor of each multi-vector's rows (per chunk with ``late_chunking``); default: the
        server's ``defaults.multivector_pool_factor``.
        ``late_chunking``: the texts are chunks of one document, embedded together in one pass
        (one request, whatever ``batch_size``), one embedding per chunk.
        """
        single = isinstance(texts, str)
        values = [texts] if isinstance(texts, str) else list(texts)
        for index, text in enumerate(values):
            if not isinstance(text, str) or not text.strip():
                raise InvalidRequestError(f"input[{index}] must be a non-empty string", param=f"input[{index}]")
        options = _options(task, prompt_name, truncate_dim, return_multivector, truncate,
                           return_dense=return_dense, late_chunking=late_chunking, pool_factor=pool_factor)
        if late_chunking:
            batch_size = max(len(values), 1)
        result = await self._run([TextInput(t) for t in values], options, batch_size, show_progress)
        return _one(result) if single else result

    @overload
    async def encode_image(self, images: ImageSource | list[ImageSource] | tuple[ImageSource, ...], *,
                           task: str = ..., truncate_dim: int | None = ..., return_multivector: Literal[False] = ...,
                           return_dense: bool = ..., batch_size: int = ...,
                           show_progress: bool | None = ..., pool_factor: int | None = ...) -> np.ndarray: ...
    @overload
    async def encode_image(self, images: ImageSource, *, task: str = ..., truncate_dim: None = ...,
                           return_multivector: Literal[True], return_dense: Literal[False] = ...,
                           batch_size: int = ..., show_progress: bool | None = ...,
                           pool_factor: int | None = ...) -> np.ndarray: ...
    @overload
    async def encode_image(self, images: list[ImageSource] | tuple[ImageSource, ...], *, task: str = ...,
                           truncate_dim: None = ..., return_multivector: Literal[True],
                           return_dense: Literal[False] = ..., batch_size: int = ...,
                           show_progress: bool | None = ..., pool_factor: int | None = ...) -> list[np.ndarray]: ...
    @overload
    async def encode_image(self, images: ImageSource | list[ImageSource] | tuple[ImageSource, ...], *,
                           task: str = ..., truncate_dim: int | None = ..., return_multivector: Literal[True],
                           return_dense: Literal[True], batch_size: int = ...,
                           show_progress: bool | None = ..., pool_factor: int | None = ...) -> DenseAndMulti: ...
    @overload
    async def encode_image(self, images: ImageSource | list[ImageSource] | tuple[ImageSource, ...], *,
                           task: str = ..., truncate_dim: int | None = ..., return_multivector: bool = ...,
                           return_dense: bool = ..., batch_size: int = ...,
                           show_progress: bool | None = ...,
                           pool_factor: int | None = ...) -> Embeddings | DenseAndMulti: ...

    async def encode_image(self, images: ImageSource | list[ImageSource] | tuple[ImageSource, ...], *,
                           task: str = "retrieval", truncate_dim: int | None = None, return_multivector: bool = False,
                           return_dense: bool = False, batch_size: int = 8, show_progress: bool | None = None,
                           pool_factor: int | None = None) -> Embeddings | DenseAndMulti:
        """Embed images given as paths, PIL images, bytes, base64/data URIs or URLs; a list or tuple
        gives one result per image, anything else one result (outputs and ``pool_factor`` as in :meth:`encode_text`)."""
        single = not isinstance(images, (list, tuple))
        values = [images] if not isinstance(images, (list, tuple)) else list(images)
        options = _options(task, "query", truncate_dim, return_multivector, False, return_dense=return_dense,
                           pool_factor=pool_factor)
        items: list[Item] = [await self._image(value, index) for index, value in enumerate(values)]
        result = await self._run(items, options, batch_size, show_progress)
        return _one(result) if single else result

    @overload
    async def encode_pdf(self, pdf: PdfSource, *, task: str = ..., truncate_dim: int | None = ...,
                         return_multivector: Literal[False] = ..., pages: PageSelection = ..., batch_size: int = ...,
                         show_progress: bool | None = ..., pool_factor: int | None = ...) -> np.ndarray: ...
    @overload
    async def encode_pdf(self, pdf: PdfSource, *, task: str = ..., truncate_dim: None = ...,
                         return_multivector: Literal[True], pages: PageSelection = ..., batch_size: int = ...,
                         show_progress: bool | None = ..., pool_factor: int | None = ...) -> list[np.ndarray]: ...
    @overload
    async def encode_pdf(self, pdf: PdfSource, *, task: str = ..., truncate_dim: int | None = ...,
                         return_multivector: bool = ..., pages: PageSelection = ..., batch_size: int = ...,
                         show_progress: bool | None = ..., pool_factor: int | None = ...) -> Embeddings: ...

    async def encode_pdf(self, pdf: PdfSource, *, task: str = "retrieval", truncate_dim: int | None = None,
                         return_multivector: bool = False, pages: PageSelection = None, batch_size: int = 8,
                         show_progress: bool | None = None, pool_factor: int | None = None) -> Embeddings:
        """Embed the pages of one PDF (path, bytes, base64/data URI or URL), in page order.

        ``pages`` selects pages ("1-3,7" or [1, 2, 3]); default: all. Pages are rendered at the
        server's ``render_dpi`` (in-process for direct clients) and sent ``batch_size`` per
        request, with a progress bar over pages. The file is uploaded once: the first request
        asks the router to keep it, the others name it by its SHA-256. [pages, d] for single
        vectors, else one [n_tokens, P] matrix per page (``pool_factor``: as in
        :meth:`encode_text`).
        """
        if batch_size < 1:
            raise InvalidRequestError("batch_size must be at least 1", param="batch_size")
        options = _options(task, "query", truncate_dim, return_multivector, False, pool_factor=pool_factor)
        plan = await self._pdf(pdf, pages, 0)
        chunks = [plan.pages[i:i + batch_size] for i in range(0, len(plan.pages), batch_size)]

        async def send(chunk: tuple[int, ...]) -> EmbedResult:
            kept = chunk is not chunks[0]  # the first request carries the file, the others its reference
            return await self._sender.embed_pdf(PdfInput(plan.data, format_pages(chunk)), options, kept=kept)

        results = await self._send_chunks(chunks, send, show_progress, unit="page", desc="Encoding PDF",
                                          first_alone=True)
        flat = [vector for result in results for vector in result.embeddings]
        return flat if options.output is OutputKind.MULTI else np.stack(flat)

    async def rerank(self, query: Any, documents: Sequence[Any], *, top_n: int | None = None,
                     return_documents: bool = False, task: str = "retrieval", scoring: Scoring = "maxsim",
                     truncate: bool = False, pool_factor: int | None = None) -> list[RerankHit]:
        """Documents ordered by relevance to ``query``, best first (the router's /v1/rerank).

        The query is a string, ``{"text": ...}``, ``{"image": src}`` or a PIL image; documents are
        those or ``{"pdf": src, "pages": "1-3"}`` / a ``Path`` to a ``.pdf`` (a PDF ranks as its
        best page, named by ``hit.page``). ``src`` is a path, bytes, base64, data URI or URL.
        ``scoring``: ``maxsim`` (multi-vector late interaction) or ``dense`` (cosine).
        ``pool_factor``: MaxSim over the documents' token-pooled rows (the query keeps all of its own).
        """
        if pool_factor is not None and (isinstance(pool_factor, bool) or not isinstance(pool_factor, int)
                                        or pool_factor < 1 or scoring != "maxsim"):
            raise InvalidRequestError("pool_factor must be an int of at least 1, with scoring='maxsim'",
                                      param="pool_factor")
        query_item = await self._rerank_item(query, 0, lambda _: "query")
        if isinstance(query_item, PdfInput):
            raise InvalidRequestError("the query must be a text or an image, not a PDF", param="query")
        items = [await self._rerank_item(d, i, lambda i: f"documents[{i}]") for i, d in enumerate(documents)]
        if not items:
            raise InvalidRequestError("documents is empty; send at least one document", param="documents")
        hits = await self._sender.rerank(query_item, items, task=task, scoring=scoring, truncate=truncate,
                                         top_n=top_n, pool_factor=pool_factor)
        if return_documents:
            for hit in hits:
                hit.document = documents[hit.index]
        return hits

    def _pdf_limits(self) -> LimitsConfig:
        return self._image_limits.model_copy(update={"max_pdf_pages_per_request": UNLIMITED_PAGES})

    async def _image(self, value: ImageSource, index: int) -> ImageInput:
        """The caller's image; its http(s) URL is fetched here, for the caller (see client/fetch.py)."""
        limits = self._image_limits
        if is_http_url(value):
            value = await fetch_own_url(value, max_bytes=limits.max_image_bytes,  # type: ignore[arg-type]
                                        timeout_s=limits.image_url_timeout_s, index=index)
        return await load_image(value, limits, index, allow_paths=True)

    async def _pdf(self, value: PdfSource, pages: PageSelection, index: int) -> PdfPlan:
        """The caller's PDF, read and planned; its http(s) URL is fetched here, for the caller."""
        limits = self._pdf_limits()
        if is_http_url(value):
            value = await fetch_own_url(value, max_bytes=limits.max_pdf_bytes,  # type: ignore[arg-type]
                                        timeout_s=limits.image_url_timeout_s, index=index, what="PDF")
        return await load_pdf(value, pages, limits, index, allow_paths=True)

    async def _rerank_item(self, value: Any, index: int, name: Callable[[int], str]) -> Item | PdfInput:
        """A rerank query or document as an item; a PDF is read and checked, not rendered."""
        kind, source, pages = "text", value, None
        if isinstance(value, dict) and len(value.keys() - {"pages"}) == 1:
            kind = next(iter(value.keys() - {"pages"}))
            source, pages = value[kind], value.get("pages")
        elif isinstance(value, Image.Image):
            kind = "image"
        elif isinstance(value, os.PathLike):
            kind = "pdf" if Path(value).suffix.lower() == ".pdf" else "image"
        try:
            if kind == "text" and isinstance(source, str):
                return TextInput(source)
            if kind == "image":
                return await self._image(source, index)
            if kind == "pdf":
                plan = await self._pdf(source, pages, index)
                return PdfInput(plan.data, format_pages(plan.pages))
        except Jv4Error as error:
            raise rename_inputs(error, name) from None
        raise InvalidRequestError(f"{name(index)} must be a string, {{\"text\": ...}}, {{\"image\": ...}}, "
                                  f"{{\"pdf\": ...}}, a PIL image or a Path", param=name(index))

    async def _run(self, items: list[Item], options: EmbedOptions, batch_size: int,
                   show_progress: bool | None) -> Embeddings | DenseAndMulti:
        if not items:  # as the router says it: an empty batch has no [0, d] shape to return
            raise InvalidRequestError("input is empty; send at least one text or image", param="input")
        if batch_size < 1:
            raise InvalidRequestError("batch_size must be at least 1", param="batch_size")
        chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]

        async def send(chunk: list[Item]) -> EmbedResult:
            return await self._sender(chunk, options)

        results = await self._send_chunks(chunks, send, show_progress, unit="item", desc="Encoding")
        flat = [vector for result in results for vector in result.embeddings]
        if options.output is OutputKind.BOTH:
            return DenseAndMulti(np.stack(flat), [m for result in results for m in result.multivectors or []])
        return flat if options.output is OutputKind.MULTI else np.stack(flat)

    async def _send_chunks(self, chunks: Sequence[Sequence[Any]], send: Callable[[Any], Awaitable[EmbedResult]],
                           show_progress: bool | None, *, unit: str, desc: str,
                           first_alone: bool = False) -> list[EmbedResult]:
        """Every chunk through ``send``, ``max_concurrency`` at a time, results in chunk order; a
        progress bar over the chunks' items (by default once a job spans several requests).
        ``first_alone``: the first chunk is answered before the others start."""
        show = len(chunks) >= PROGRESS_MIN_BATCHES if show_progress is None else show_progress
        gate = asyncio.Semaphore(self._max_concurrency)
        results: list[EmbedResult | None] = [None] * len(chunks)
        with tqdm(total=sum(len(c) for c in chunks), disable=not show, unit=unit, desc=desc) as bar:
            async def one(position: int, chunk: Sequence[Any]) -> None:
                async with gate:
                    results[position] = await send(chunk)
                bar.update(len(chunk))
            start = 0
            if first_alone and chunks:
                await one(0, chunks[0])
                start = 1
            await all_or_first_error(one(position, chunks[position]) for position in range(start, len(chunks)))
        return results  # type: ignore[return-value]
