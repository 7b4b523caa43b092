"""What the LangChain and LlamaIndex classes share: the role split and the clients behind it.

Frameworks embed documents and queries through different methods, and jina-embeddings-v4
wants different prompts for them (``retrieval.passage`` vs ``retrieval.query``). This
module maps each method to the task and role the router expects and owns the project's
clients: one blocking :class:`~jv4_vllm.client.Client` (its own loop thread, so it also
works inside a running event loop) and one :class:`~jv4_vllm.client.AsyncClient` per
event loop (an HTTP connection pool cannot move between loops). It imports no framework.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from jv4_vllm.client import AsyncClient, Client
from jv4_vllm.core.images import ImageSource
from jv4_vllm.core.types import TASK_NAMES

__all__ = ["DEFAULT_MODEL", "TASKS", "RoleClients", "RouterSettings"]

Role = Literal["query", "passage"]
TASKS = TASK_NAMES  # the tasks an integration may be built for
DEFAULT_MODEL = "jina-embeddings-v4"


@dataclass(frozen=True)
class RouterSettings:
    """Where the router is and how to embed: the task decides the adapter, methods decide the role."""

    url: str
    task: str = "retrieval"
    dimensions: int | None = None
    model: str = DEFAULT_MODEL
    api_key: str | None = None
    batch_size: int = 32
    timeout: float = 300.0
    max_concurrency: int = 4

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)} (the role comes from the method), got {self.task!r}")
        if self.dimensions is not None and (isinstance(self.dimensions, bool) or self.dimensions < 1):
            raise ValueError(f"dimensions must be a positive int, got {self.dimensions!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size!r}")

    def __repr__(self) -> str:  # the key stays out of logs and tracebacks
        return (f"RouterSettings(url={self.url!r}, task={self.task!r}, dimensions={self.dimensions!r}, "
                f"model={self.model!r})")


class RoleClients:
    """Embeds texts in a role, and images, through the router; returns plain float lists."""

    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._sync: Client | None = None
        self._async: tuple[asyncio.AbstractEventLoop, AsyncClient] | None = None

    def _options(self, role: Role) -> dict[str, Any]:
        return {"task": self.settings.task, "prompt_name": role, "truncate_dim": self.settings.dimensions,
                "batch_size": self.settings.batch_size, "show_progress": False}

    def _image_options(self) -> dict[str, Any]:
        # images take one prompt whatever the role (the reference encoder's rule)
        return {"task": self.settings.task, "truncate_dim": self.settings.dimensions,
                "batch_size": self.settings.batch_size, "show_progress": False}

    def _client(self) -> Client:
        with self._lock:
            if self._sync is None:
                s = self.settings
                self._sync = Client(s.url, api_key=s.api_key, model=s.model, timeout=s.timeout,
                                    max_concurrency=s.max_concurrency)
            return self._sync

    def _aclient(self) -> AsyncClient:
        loop = asyncio.get_running_loop()
        if self._async is None or self._async[0] is not loop:
            s = self.settings
            self._async = (loop, AsyncClient(s.url, api_key=s.api_key, model=s.model, timeout=s.timeout,
                                             max_concurrency=s.max_concurrency))
        return self._async[1]

    def texts(self, texts: Sequence[str], role: Role) -> list[list[float]]:
        if not texts:
            return []
        return _rows(self._client().encode_text(list(texts), **self._options(role)))

    async def atexts(self, texts: Sequence[str], role: Role) -> list[list[float]]:
        if not texts:
            return []
        return _rows(await self._aclient().encode_text(list(texts), **self._options(role)))

    def images(self, images: Sequence[ImageSource]) -> list[list[float]]:
        if not images:
            return []
        return _rows(self._client().encode_image(list(images), **self._image_options()))

    async def aimages(self, images: Sequence[ImageSource]) -> list[list[float]]:
        if not images:
            return []
        return _rows(await self._aclient().encode_image(list(images), **self._image_options()))

    def close(self) -> None:
        """Stop the blocking client's thread (an async client is closed by :meth:`aclose`)."""
        with self._lock:
            client, self._sync = self._sync, None
        if client is not None:
            client.close()

    async def aclose(self) -> None:
        """Close the async client of the running loop and the blocking client."""
        pair, self._async = self._async, None
        if pair is not None and pair[0] is asyncio.get_running_loop():
            await pair[1].aclose()
        await asyncio.to_thread(self.close)


def _rows(vectors: Any) -> list[list[float]]:
    return np.asarray(vectors, dtype=np.float32).tolist()
