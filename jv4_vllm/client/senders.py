"""How a client's requests reach the engine: over HTTP to a router, or in-process.

A sender takes items and engine options and returns an :class:`EmbedResult`; the clients
above it only split, schedule and stack.
"""

from __future__ import annotations

import base64
from typing import Any, Awaitable, Callable

import httpx
import orjson

from jv4_vllm.core.engine import Engine
from jv4_vllm.core.types import EmbedOptions, EmbedResult, Item, TextInput
from jv4_vllm.core.wire import decode_embedding_item
from jv4_vllm.errors import error_from_body

__all__ = ["EngineSender", "RouterSender", "Sender"]

Sender = Callable[[list[Item], EmbedOptions], Awaitable[EmbedResult]]
EMBEDDINGS_PATH = "/v1/embeddings"
_JSON = {"content-type": "application/json"}


class RouterSender:
    """Sends items to a jv4_vllm router's /v1/embeddings (base64 float32 on the wire).

    :meth:`body`, :meth:`post` and :meth:`result` are the three steps of a call, apart so a
    load generator can build bodies before its clock starts and count the bytes it moves.
    """

    def __init__(self, url: str, api_key: str | None, model: str, timeout: float,
                 *, http: httpx.AsyncClient | None = None) -> None:
        self._url = url.rstrip("/") + EMBEDDINGS_PATH
        self._headers = {"Authorization": f"Bearer {api_key}", **_JSON} if api_key else dict(_JSON)
        self._own_http = http is None
        self._http = http or httpx.AsyncClient(timeout=timeout)
        self._model = model

    def body(self, items: list[Item], options: EmbedOptions) -> bytes:
        """The request body for ``items``: our task names, base64 answers."""
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
        if options.late_chunking:
            body["late_chunking"] = True
        if options.dense_and_multivector:
            body["return_dense"] = True
        return orjson.dumps(body)

    async def post(self, body: bytes) -> httpx.Response:
        """POST one body; an error answer raises the class the router rendered."""
        response = await self._http.post(self._url, content=body, headers=self._headers)
        if response.status_code >= 400:
            payload = response.json() if response.content else {}
            retry = response.headers.get("retry-after")
            raise error_from_body(response.status_code, payload, float(retry) if retry else None)
        return response

    @staticmethod
    def result(response: httpx.Response) -> EmbedResult:
        """The embeddings of a successful answer, in input order."""
        payload = orjson.loads(response.content)
        data = sorted(payload["data"], key=lambda e: e["index"])
        tokens = int(payload.get("usage", {}).get("prompt_tokens", 0))
        if data and "embeddings" in data[0] and "embedding" in data[0]:  # return_dense: both outputs
            return EmbedResult(embeddings=[decode_embedding_item({"embedding": e["embedding"]}) for e in data],
                               multivectors=[decode_embedding_item(e) for e in data], prompt_tokens=tokens)
        return EmbedResult(embeddings=[decode_embedding_item(entry) for entry in data], prompt_tokens=tokens)

    async def __call__(self, items: list[Item], options: EmbedOptions) -> EmbedResult:
        return self.result(await self.post(self.body(items, options)))

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()


def _item_payload(item: Item) -> dict[str, str]:
    if isinstance(item, TextInput):
        return {"text": item.text}
    return {"image": base64.b64encode(item.data).decode("ascii")}


class EngineSender:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def __call__(self, items: list[Item], options: EmbedOptions) -> EmbedResult:
        return await self._engine.embed(items, options)

    async def aclose(self) -> None:
        await self._engine.aclose()
