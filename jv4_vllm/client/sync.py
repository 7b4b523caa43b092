"""The blocking client: :class:`AsyncClient` driven from its own event loop thread.

Every method has the signature of its async twin (keyword-only options, the same
``@overload`` return types), so a type checker reads both alike.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

import numpy as np

from jv4_vllm.client.aio import AsyncClient, DenseAndMulti, Embeddings
from jv4_vllm.client.retries import DEFAULT_RETRIES, Retries
from jv4_vllm.config import Config
from jv4_vllm.core.images import ImageSource
from jv4_vllm.core.pdf import PageSelection, PdfSource
from jv4_vllm.core.scoring import RerankHit, Scoring
from jv4_vllm.core.types import Role

__all__ = ["Client"]

T = TypeVar("T")
Images = ImageSource | list[ImageSource] | tuple[ImageSource, ...]


class Client:
    """Blocking client over :class:`AsyncClient`, with its own event loop thread.

    ``Client(url)`` talks to a router; ``Client.direct(config)`` runs the engine in-process.
    """

    def __init__(self, url: str, *, api_key: str | None = None, model: str = "jina-embeddings-v4",
                 timeout: float = 300.0, max_concurrency: int = 4, retries: Retries = DEFAULT_RETRIES) -> None:
        self._start(AsyncClient(url, api_key=api_key, model=model, timeout=timeout, max_concurrency=max_concurrency,
                                retries=retries))

    def _start(self, client: AsyncClient | Coroutine[Any, Any, AsyncClient]) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="jv4-client", daemon=True)
        self._thread.start()
        self._async: AsyncClient | None = None
        try:
            self._async = client if isinstance(client, AsyncClient) else self._call(client)
        except BaseException:
            self.close()
            raise

    @classmethod
    def direct(cls, config: Config | str | Path, *, max_concurrency: int = 4) -> Client:
        """Embed in-process through the deployments listed in ``config`` (no router)."""
        client = cls.__new__(cls)
        client._start(AsyncClient.direct(config, max_concurrency=max_concurrency))
        return client

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _client(self) -> AsyncClient:
        if self._async is None:
            raise RuntimeError("this client is closed")
        return self._async

    @overload
    def encode_text(self, texts: str | Sequence[str], *, task: str = ..., prompt_name: Role = ...,
                    truncate_dim: int | None = ..., return_multivector: Literal[False] = ...,
                    return_dense: bool = ..., batch_size: int = ..., show_progress: bool | None = ...,
                    truncate: bool = ..., late_chunking: bool = ...,
                    pool_factor: int | None = ...) -> np.ndarray: ...
    @overload
    def encode_text(self, texts: str, *, task: str = ..., prompt_name: Role = ..., truncate_dim: None = ...,
                    return_multivector: Literal[True], return_dense: Literal[False] = ..., batch_size: int = ...,
                    show_progress: bool | None = ..., truncate: bool = ...,
                    late_chunking: bool = ...,
                    pool_factor: int | None = ...) -> np.ndarray: ...
    @overload
    def encode_text(self, texts: Sequence[str], *, task: str = ..., prompt_name: Role = ...,
                    truncate_dim: None = ..., return_multivector: Literal[True], return_dense: Literal[False] = ...,
                    batch_size: int = ..., show_progress: bool | None = ..., truncate: bool = ...,
                    late_chunking: bool = ...,
                    pool_factor: int | None = ...) -> list[np.ndarray]: ...
    @overload
    def encode_text(self, texts: str | Sequence[str], *, task: str = ..., prompt_name: Role = ...,
                    truncate_dim: int | None = ..., return_multivector: Literal[True], return_dense: Literal[True],
                    batch_size: int = ..., show_progress: bool | None = ..., truncate: bool = ...,
                    late_chunking: bool = ...,
                    pool_factor: int | None = ...) -> DenseAndMulti: ...
    @overload
    def encode_text(self, texts: str | Sequence[str], *, task: str = ..., prompt_name: Role = ...,
                    truncate_dim: int | None = ..., return_multivector: bool = ..., return_dense: bool = ...,
                    batch_size: int = ..., show_progress: bool | None = ..., truncate: bool = ...,
                    late_chunking: bool = ...,
                    pool_factor: int | None = ...) -> Embeddings | DenseAndMulti: ...

    def encode_text(self, texts: str | Sequence[str], *, task: str = "retrieval", prompt_name: Role = "query",
                    truncate_dim: int | None = None, return_multivector: bool = False, return_dense: bool = False,
                    batch_size: int = 32, show_progress: bool | None = None, truncate: bool = False,
                    late_chunking: bool = False, pool_factor: int | None = None) -> Embeddings | DenseAndMulti:
        """See :meth:`AsyncClient.encode_text`."""
        return self._call(self._client().encode_text(
            texts, task=task, prompt_name=prompt_name, truncate_dim=truncate_dim,
            return_multivector=return_multivector, return_dense=return_dense, batch_size=batch_size,
            show_progress=show_progress, truncate=truncate, late_chunking=late_chunking,
            pool_factor=pool_factor))

    @overload
    def encode_image(self, images: Images, *, task: str = ..., truncate_dim: int | None = ...,
                     return_multivector: Literal[False] = ..., return_dense: bool = ..., batch_size: int = ...,
                     show_progress: bool | None = ...,
                    pool_factor: int | None = ...) -> np.ndarray: ...
    @overload
    def encode_image(self, images: ImageSource, *, task: str = ..., truncate_dim: None = ...,
                     return_multivector: Literal[True], return_dense: Literal[False] = ..., batch_size: int = ...,
                     show_progress: bool | None = ...,
                    pool_factor: int | None = ...) -> np.ndarray: ...
    @overload
    def encode_image(self, images: list[ImageSource] | tuple[ImageSource, ...], *, task: str = ...,
                     truncate_dim: None = ..., return_multivector: Literal[True], return_dense: Literal[False] = ...,
                     batch_size: int = ..., show_progress: bool | None = ...,
                    pool_factor: int | None = ...) -> list[np.ndarray]: ...
    @overload
    def encode_image(self, images: Images, *, task: str = ..., truncate_dim: int | None = ...,
                     return_multivector: Literal[True], return_dense: Literal[True], batch_size: int = ...,
                     show_progress: bool | None = ...,
                    pool_factor: int | None = ...) -> DenseAndMulti: ...
    @overload
    def encode_image(self, images: Images, *, task: str = ..., truncate_dim: int | None = ...,
                     return_multivector: bool = ..., return_dense: bool = ..., batch_size: int = ...,
                     show_progress: bool | None = ...,
                    pool_factor: int | None = ...) -> Embeddings | DenseAndMulti: ...

    def encode_image(self, images: Images, *, task: str = "retrieval", truncate_dim: int | None = None,
                     return_multivector: bool = False, return_dense: bool = False, batch_size: int = 8,
                     show_progress: bool | None = None, pool_factor: int | None = None) -> Embeddings | DenseAndMulti:
        """See :meth:`AsyncClient.encode_image`."""
        return self._call(self._client().encode_image(
            images, task=task, truncate_dim=truncate_dim, return_multivector=return_multivector,
            return_dense=return_dense, batch_size=batch_size, show_progress=show_progress,
            pool_factor=pool_factor))

    @overload
    def encode_pdf(self, pdf: PdfSource, *, task: str = ..., truncate_dim: int | None = ...,
                   return_multivector: Literal[False] = ..., pages: PageSelection = ..., batch_size: int = ...,
                   show_progress: bool | None = ...,
                    pool_factor: int | None = ...) -> np.ndarray: ...
    @overload
    def encode_pdf(self, pdf: PdfSource, *, task: str = ..., truncate_dim: None = ...,
                   return_multivector: Literal[True], pages: PageSelection = ..., batch_size: int = ...,
                   show_progress: bool | None = ...,
                    pool_factor: int | None = ...) -> list[np.ndarray]: ...
    @overload
    def encode_pdf(self, pdf: PdfSource, *, task: str = ..., truncate_dim: int | None = ...,
                   return_multivector: bool = ..., pages: PageSelection = ..., batch_size: int = ...,
                   show_progress: bool | None = ...,
                    pool_factor: int | None = ...) -> Embeddings: ...

    def encode_pdf(self, pdf: PdfSource, *, task: str = "retrieval", truncate_dim: int | None = None,
                   return_multivector: bool = False, pages: PageSelection = None, batch_size: int = 8,
                   show_progress: bool | None = None, pool_factor: int | None = None) -> Embeddings:
        """See :meth:`AsyncClient.encode_pdf`."""
        return self._call(self._client().encode_pdf(
            pdf, task=task, truncate_dim=truncate_dim, return_multivector=return_multivector, pages=pages,
            batch_size=batch_size, show_progress=show_progress, pool_factor=pool_factor))

    def rerank(self, query: Any, documents: Sequence[Any], *, top_n: int | None = None,
               return_documents: bool = False, task: str = "retrieval", scoring: Scoring = "maxsim",
               truncate: bool = False, pool_factor: int | None = None) -> list[RerankHit]:
        """See :meth:`AsyncClient.rerank`."""
        return self._call(self._client().rerank(query, documents, top_n=top_n, return_documents=return_documents,
                                                task=task, scoring=scoring, truncate=truncate,
                                                pool_factor=pool_factor))

    def close(self) -> None:
        if self._async is not None:
            self._call(self._async.aclose())
            self._async = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
