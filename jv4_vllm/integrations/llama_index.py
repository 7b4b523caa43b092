"""LlamaIndex embeddings for a jv4_vllm router, with the passage and query roles kept apart.

LlamaIndex embeds nodes through its text methods and questions through its query
methods; this class sends the first as ``<task>.passage`` and the second as
``<task>.query`` (``text-matching`` is symmetric and uses one prompt for both), and
embeds images for multi-modal indexes. Needs ``pip install 'jv4_vllm[llama-index]'``.

    from llama_index.core import Document, VectorStoreIndex
    embed_model = JinaV4Embedding("http://127.0.0.1:8080")
    index = VectorStoreIndex.from_documents([Document(text="a passage")], embed_model=embed_model)
    index.as_retriever().retrieve("a question")
"""

from __future__ import annotations

import io
from typing import Any

try:
    from llama_index.core.base.embeddings.base import Embedding
    from llama_index.core.bridge.pydantic import Field, PrivateAttr
    from llama_index.core.callbacks.base import CallbackManager
    from llama_index.core.embeddings import MultiModalEmbedding
    from llama_index.core.schema import ImageType
except ImportError as exc:  # pragma: no cover - exercised by the import test in a subprocess
    raise ImportError("jv4_vllm.integrations.llama_index needs llama-index-core: "
                      "pip install 'jv4_vllm[llama-index]'") from exc

from jv4_vllm.core.images import ImageSource
from jv4_vllm.integrations._roles import DEFAULT_MODEL, RoleClients, RouterSettings

__all__ = ["JinaV4Embedding"]

DEFAULT_BATCH_SIZE = 32


class JinaV4Embedding(MultiModalEmbedding):
    """jina-embeddings-v4 behind a jv4_vllm router, as a LlamaIndex ``MultiModalEmbedding``.

    ``task`` picks the adapter (``retrieval``, ``code`` or ``text-matching``); query methods
    use the query role, text and document methods the passage role. One LlamaIndex batch
    (``embed_batch_size`` inputs) is one request to the router.
    """

    base_url: str = Field(description="URL of the jv4_vllm router (without /v1).")
    task: str = Field(default="retrieval", description="Adapter: retrieval, code or text-matching.")
    dimensions: int | None = Field(default=None, description="Matryoshka truncation; None keeps the full size.")
    timeout: float = Field(default=300.0, description="Seconds to wait for one request.")
    max_concurrency: int = Field(default=4, description="Requests in flight at once per call.")
    api_key: str | None = Field(default=None, exclude=True, repr=False,
                                   description="Bearer key for the router (never serialised).")

    _clients: RoleClients | None = PrivateAttr(default=None)

    def __init__(self, base_url: str, *, task: str = "retrieval", dimensions: int | None = None,
                 api_key: str | None = None, model_name: str = DEFAULT_MODEL,
                 embed_batch_size: int = DEFAULT_BATCH_SIZE, timeout: float = 300.0, max_concurrency: int = 4,
                 callback_manager: CallbackManager | None = None, **kwargs: Any) -> None:
        super().__init__(base_url=base_url, task=task, dimensions=dimensions, api_key=api_key,
                         model_name=model_name, embed_batch_size=embed_batch_size, timeout=timeout,
                         max_concurrency=max_concurrency, callback_manager=callback_manager, **kwargs)
        self._role_clients()  # a bad task or size fails here, not at the first embedding

    @classmethod
    def class_name(cls) -> str:
        return "JinaV4Embedding"

    def _role_clients(self) -> RoleClients:
        """The clients for the current fields (fields are plain attributes and may be reassigned)."""
        settings = RouterSettings(url=self.base_url, task=self.task, dimensions=self.dimensions,
                                  model=self.model_name, api_key=self.api_key, batch_size=self.embed_batch_size,
                                  timeout=self.timeout, max_concurrency=self.max_concurrency)
        current = self._clients
        if current is None or current.settings != settings:
            self._clients = RoleClients(settings)
            if current is not None:
                current.close()
        return self._clients  # type: ignore[return-value]

    # ---- queries: query role -----------------------------------------------------------------
    def _get_query_embedding(self, query: str) -> Embedding:
        return self._role_clients().texts([query], "query")[0]

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return (await self._role_clients().atexts([query], "query"))[0]

    # ---- texts and nodes: passage role ---------------------------------------------------------
    def _get_text_embedding(self, text: str) -> Embedding:
        return self._role_clients().texts([text], "passage")[0]

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return (await self._role_clients().atexts([text], "passage"))[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._role_clients().texts(texts, "passage")

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return await self._role_clients().atexts(texts, "passage")

    # ---- images: one prompt in every role --------------------------------------------------------
    def _get_image_embedding(self, img_file_path: ImageType) -> Embedding:
        return self._role_clients().images([_image(img_file_path)])[0]

    async def _aget_image_embedding(self, img_file_path: ImageType) -> Embedding:
        return (await self._role_clients().aimages([_image(img_file_path)]))[0]

    def _get_image_embeddings(self, img_file_paths: list[ImageType]) -> list[Embedding]:
        return self._role_clients().images([_image(path) for path in img_file_paths])

    async def _aget_image_embeddings(self, img_file_paths: list[ImageType]) -> list[Embedding]:
        return await self._role_clients().aimages([_image(path) for path in img_file_paths])

    def close(self) -> None:
        """Stop the blocking client's worker thread; the object can still be used afterwards."""
        if self._clients is not None:
            self._clients.close()

    async def aclose(self) -> None:
        """Close the connections of the running loop's client and the blocking client."""
        if self._clients is not None:
            await self._clients.aclose()


def _image(value: ImageType | ImageSource) -> ImageSource:
    """LlamaIndex passes paths, URLs or in-memory files; the client takes paths, URLs and bytes."""
    if isinstance(value, io.BytesIO):
        return value.getvalue()
    return value
