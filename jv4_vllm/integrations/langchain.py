"""LangChain embeddings for a jv4_vllm router, with the passage and query roles kept apart.

LangChain's OpenAI class sends one request shape for documents and queries, so every
vector comes back as ``text-matching``. Here ``embed_documents`` asks for
``<task>.passage`` and ``embed_query`` for ``<task>.query`` (``text-matching`` is
symmetric and uses one prompt for both). Needs ``pip install 'jv4_vllm[langchain]'``.

    from langchain_core.vectorstores import InMemoryVectorStore
    embeddings = JinaV4Embeddings("http://127.0.0.1:8080")
    store = InMemoryVectorStore.from_texts(["a passage", "another"], embeddings)
    store.as_retriever().invoke("a question")
"""

from __future__ import annotations

from collections.abc import Sequence

try:
    from langchain_core.embeddings import Embeddings
except ImportError as exc:  # pragma: no cover - exercised by the import test in a subprocess
    raise ImportError("jv4_vllm.integrations.langchain needs langchain-core: "
                      "pip install 'jv4_vllm[langchain]'") from exc

from jv4_vllm.core.images import ImageSource
from jv4_vllm.integrations._roles import DEFAULT_MODEL, RoleClients, RouterSettings

__all__ = ["JinaV4Embeddings"]


class JinaV4Embeddings(Embeddings):
    """jina-embeddings-v4 behind a jv4_vllm router, as a LangChain ``Embeddings``.

    ``task`` picks the adapter (``retrieval``, ``code`` or ``text-matching``); the method
    picks the role. ``dimensions`` truncates Matryoshka-style. ``embed_image`` takes
    paths, URLs, bytes, base64/data URIs or PIL images, for stores with ``add_images``.
    """

    def __init__(self, url: str, *, task: str = "retrieval", dimensions: int | None = None,
                 api_key: str | None = None, model: str = DEFAULT_MODEL, batch_size: int = 32,
                 timeout: float = 300.0, max_concurrency: int = 4) -> None:
        self._clients = RoleClients(RouterSettings(
            url=url, task=task, dimensions=dimensions, model=model, api_key=api_key, batch_size=batch_size,
            timeout=timeout, max_concurrency=max_concurrency))

    @property
    def task(self) -> str:
        return self._clients.settings.task

    @property
    def dimensions(self) -> int | None:
        """Matryoshka truncation (None: the model's full size)."""
        return self._clients.settings.dimensions

    def __repr__(self) -> str:
        return f"JinaV4Embeddings({self._clients.settings!r})"

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Documents in the passage role (``text-matching``: its one prompt)."""
        return self._clients.texts(texts, "passage")

    def embed_query(self, text: str) -> list[float]:
        """A query in the query role."""
        return self._clients.texts([text], "query")[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        return await self._clients.atexts(texts, "passage")

    async def aembed_query(self, text: str) -> list[float]:
        return (await self._clients.atexts([text], "query"))[0]

    def embed_image(self, uris: Sequence[ImageSource]) -> list[list[float]]:
        """Images (the same prompt in every role), comparable with text queries of the same task."""
        return self._clients.images(uris)

    async def aembed_image(self, uris: Sequence[ImageSource]) -> list[list[float]]:
        return await self._clients.aimages(uris)

    def close(self) -> None:
        """Stop the blocking client's worker thread; the object can still be used afterwards."""
        self._clients.close()

    async def aclose(self) -> None:
        """Close the connections of the running loop's client and the blocking client."""
        await self._clients.aclose()
