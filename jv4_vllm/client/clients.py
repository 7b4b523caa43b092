"""The public Python client: ``Client(router_url)`` or ``Client.direct(config)``.

Both speak the same methods and return numpy arrays: [N, d] for single vectors, a list of
[n_i, P] arrays for multi-vectors (never a ragged stack). Large inputs are split into
requests of ``batch_size`` sent concurrently, with a progress bar for long jobs. The
direct client runs the engine in-process against the vLLM deployments (no router hop).
"""

from __future__ import annotations

import asyncio
import base64
import threading
from pathlib import Path
from typing import Any, Awaitable, Callable, Coroutine, Sequence, TypeVar

import httpx
import numpy as np
from tqdm.auto import tqdm

from jv4_vllm.config import Config, LimitsConfig, load_config
from jv4_vllm.core.engine import Engine
from jv4_vllm.errors import InvalidRequestError, error_from_body
from jv4_vllm.core.images import ImageSource, load_image
from jv4_vllm.core.types import EmbedOptions, EmbedResult, Item, TextInput, parse_task
from jv4_vllm.core.wire import decode_embedding_item

__all__ = ["AsyncClient", "Client"]

T = TypeVar("T")
KNOWN_TASKS = ("retrieval", "text-matching", "code")
PROGRESS_MIN_BATCHES = 4  # show a bar by default once a job spans this many requests
Embeddings = np.ndarray | list[np.ndarray]
Sender = Callable[[list[Item], EmbedOptions], Awaitable[EmbedResult]]


def _options(task: str, prompt_name: str, truncate_dim: int | None, return_multivector: bool,
             truncate: bool) -> EmbedOptions:
    name, role = parse_task(task if "." in task else f"{task}.{prompt_name}", KNOWN_TASKS)
    if return_multivector and truncate_dim is not None:
        raise InvalidRequestError("truncate_dim cannot be combined with return_multivector", param="truncate_dim")
    return EmbedOptions(task=name, role=role, dimensions=truncate_dim, multivector=return_multivector,
                        truncate=truncate)


class _RouterSender:
    """Sends items to a jv4_vllm router's /v1/embeddings (base64 float32 on the wire)."""

    def __init__(self, url: str, api_key: str | None, model: str, timeout: float) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self._model = model

    async def __call__(self, items: list[Item], options: EmbedOptions) -> EmbedResult:
        body: dict[str, Any] = {
            "model": self._model,
            "input": [_item_payload(item) for item in items],
            "task": f"{options.task}.{options.role}" if options.task != "text-matching" else options.task,
            "embedding_type": "base64",
            "return_multivector": options.multivector,
            "truncate": options.truncate,
        }
        if options.dimensions is not None:
            body["dimensions"] = options.dimensions
        response = await self._http.post("/v1/embeddings", json=body)
        payload = response.json() if response.content else {}
        if response.status_code >= 400:
            retry = response.headers.get("retry-after")
            raise error_from_body(response.status_code, payload, float(retry) if retry else None)
        return EmbedResult(
            embeddings=[decode_embedding_item(entry) for entry in sorted(payload["data"], key=lambda e: e["index"])],
            prompt_tokens=int(payload.get("usage", {}).get("prompt_tokens", 0)),
        )

    async def aclose(self) -> None:
        await self._http.aclose()


def _item_payload(item: Item) -> dict[str, str]:
    if isinstance(item, TextInput):
        return {"text": item.text}
    return {"image": base64.b64encode(item.data).decode("ascii")}


class _EngineSender:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def __call__(self, items: list[Item], options: EmbedOptions) -> EmbedResult:
        return await self._engine.embed(items, options)

    async def aclose(self) -> None:
        await self._engine.aclose()


class AsyncClient:
    """Async client. ``AsyncClient(url)`` talks to a router; ``await AsyncClient.direct(config)`` runs the engine."""

    def __init__(self, url: str | None = None, *, api_key: str | None = None, model: str = "jina-embeddings-v4",
                 timeout: float = 300.0, max_concurrency: int = 4, _sender: Any = None) -> None:
        if _sender is None and url is None:
            raise ValueError("give the router URL, or use AsyncClient.direct(config)")
        self._sender = _sender or _RouterSender(url, api_key, model, timeout)  # type: ignore[arg-type]
        self._max_concurrency = max_concurrency
        # The caller's own files and URLs: paths and URLs are allowed, size and pixel caps still apply.
        self._image_limits = LimitsConfig(allow_image_urls=True)

    @classmethod
    async def direct(cls, config: Config | str | Path, *, max_concurrency: int = 4) -> "AsyncClient":
        """Embed in-process through the deployments listed in ``config`` (no router)."""
        cfg = config if isinstance(config, Config) else load_config(config)
        client = cls(_sender=_EngineSender(await Engine.start(cfg)), max_concurrency=max_concurrency)
        client._image_limits = cfg.limits.model_copy(update={"allow_image_urls": True})
        return client

    async def aclose(self) -> None:
        await self._sender.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def encode_text(self, texts: str | Sequence[str], task: str = "retrieval", prompt_name: str = "query",
                          truncate_dim: int | None = None, return_multivector: bool = False,
                          batch_size: int = 32, show_progress: bool | None = None,
                          truncate: bool = False) -> Embeddings:
        """Embed texts; a single string gives a single vector (or one multi-vector)."""
        single = isinstance(texts, str)
        values = [texts] if single else list(texts)
        for index, text in enumerate(values):
            if not isinstance(text, str) or not text.strip():
                raise InvalidRequestError(f"input[{index}] must be a non-empty string", param=f"input[{index}]")
        options = _options(task, prompt_name, truncate_dim, return_multivector, truncate)
        result = await self._run([TextInput(t) for t in values], options, batch_size, show_progress)
        return result[0] if single else result

    async def encode_image(self, images: ImageSource | Sequence[ImageSource], task: str = "retrieval",
                           truncate_dim: int | None = None, return_multivector: bool = False,
                           batch_size: int = 8, show_progress: bool | None = None) -> Embeddings:
        """Embed images given as paths, PIL images, bytes, base64/data URIs or URLs."""
        single = not isinstance(images, (list, tuple))
        values = [images] if single else list(images)
        options = _options(task, "query", truncate_dim, return_multivector, False)
        items: list[Item] = [await load_image(value, self._image_limits, index, allow_paths=True)
                             for index, value in enumerate(values)]
        result = await self._run(items, options, batch_size, show_progress)
        return result[0] if single else result

    async def _run(self, items: list[Item], options: EmbedOptions, batch_size: int,
                   show_progress: bool | None) -> Embeddings:
        if batch_size < 1:
            raise InvalidRequestError("batch_size must be at least 1", param="batch_size")
        chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
        show = len(chunks) >= PROGRESS_MIN_BATCHES if show_progress is None else show_progress
        gate = asyncio.Semaphore(self._max_concurrency)
        outputs: list[list[np.ndarray]] = [[] for _ in chunks]
        with tqdm(total=len(items), disable=not show, unit="item", desc="Encoding") as bar:
            async def send(position: int, chunk: list[Item]) -> None:
                async with gate:
                    result = await self._sender(chunk, options)
                outputs[position] = result.embeddings
                bar.update(len(chunk))
            try:
                async with asyncio.TaskGroup() as group:
                    for position, chunk in enumerate(chunks):
                        group.create_task(send(position, chunk))
            except ExceptionGroup as failure:
                raise failure.exceptions[0] from None
        flat = [vector for part in outputs for vector in part]
        return flat if options.multivector else np.stack(flat)


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
