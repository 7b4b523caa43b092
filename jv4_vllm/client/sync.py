"""The blocking client: :class:`AsyncClient` driven from its own event loop thread."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, Coroutine, Sequence, TypeVar

from jv4_vllm.client.aio import AsyncClient, Embeddings
from jv4_vllm.config import Config
from jv4_vllm.core.images import ImageSource
from jv4_vllm.core.pdf import PdfSource
from jv4_vllm.core.scoring import RerankHit

__all__ = ["Client"]

T = TypeVar("T")


class Client:
    """Blocking client over :class:`AsyncClient`, with its own event loop thread."""

    def __init__(self, url: str | None = None, *, api_key: str | None = None, model: str = "jina-embeddings-v4",
                 timeout: float = 300.0, max_concurrency: int = 4) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="jv4-client", daemon=True)
        self._thread.start()
        self._async: AsyncClient | None = None
        if url is not None:
            self._async = self._call(self._make(url, api_key, model, timeout, max_concurrency))

    @staticmethod
    async def _make(url: str, api_key: str | None, model: str, timeout: float, max_concurrency: int) -> AsyncClient:
        return AsyncClient(url, api_key=api_key, model=model, timeout=timeout, max_concurrency=max_concurrency)

    @classmethod
    def direct(cls, config: Config | str | Path, *, max_concurrency: int = 4) -> "Client":
        """Embed in-process through the deployments listed in ``config`` (no router)."""
        client = cls()
        client._async = client._call(AsyncClient.direct(config, max_concurrency=max_concurrency))
        return client

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _client(self) -> AsyncClient:
        if self._async is None:
            raise RuntimeError("this client is closed")
        return self._async

    def encode_text(self, texts: str | Sequence[str], **kwargs: Any) -> Embeddings:
        """See :meth:`AsyncClient.encode_text`."""
        return self._call(self._client().encode_text(texts, **kwargs))

    def encode_image(self, images: ImageSource | Sequence[ImageSource], **kwargs: Any) -> Embeddings:
        """See :meth:`AsyncClient.encode_image`."""
        return self._call(self._client().encode_image(images, **kwargs))

    def encode_pdf(self, pdf: PdfSource, **kwargs: Any) -> Embeddings:
        """See :meth:`AsyncClient.encode_pdf`."""
        return self._call(self._client().encode_pdf(pdf, **kwargs))

    def rerank(self, query: Any, documents: Sequence[Any], **kwargs: Any) -> list[RerankHit]:
        """See :meth:`AsyncClient.rerank`."""
        return self._call(self._client().rerank(query, documents, **kwargs))

    def close(self) -> None:
        if self._async is not None:
            self._call(self._async.aclose())
            self._async = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
