"""The ways to get embeddings that the benchmark puts side by side.

Every path turns a list of workload indices into one request (built before the clock
starts) and returns an :class:`Outcome`. The direct vLLM paths stop at the wire (decoded
hidden states, no pooling); :meth:`VllmPath.vectors` pools them afterwards with the
engine's own pooling, only for the cross-path equality check. The router path is the
client's own router sender.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import numpy as np
import orjson

from jv4_vllm.bench.workloads import Workload
from jv4_vllm.client.senders import RouterSender
from jv4_vllm.core.engine import Engine
from jv4_vllm.core.pooler_contract import POOLER_CONFIG, POOLING_PATH
from jv4_vllm.core.prompts import PromptBuilder
from jv4_vllm.core.types import EmbedOptions, OutputKind
from jv4_vllm.core.stream import decode_body
from jv4_vllm.core.wire import pooling_wire_fields

__all__ = ["EnginePath", "Outcome", "ReferencePath", "RouterPath", "VllmPath", "json_post"]

Mode = Literal["single", "multi"]
JSON_HEADERS = {"content-type": "application/json"}


@dataclass(slots=True)
class Outcome:
    items: int
    tokens: int
    wire_bytes: int  # request + response bytes on the hop this path's client talks over
    arrays: list[np.ndarray]


class HttpError(RuntimeError):
    """A non-2xx answer; the cell counts it as an error."""


async def json_post(http: httpx.AsyncClient, url: str, body: bytes) -> httpx.Response:
    response = await http.post(url, content=body, headers=JSON_HEADERS)
    if response.status_code >= 400:
        raise HttpError(f"{url}: HTTP {response.status_code}: {response.text[:200]}")
    return response


class VllmPath:
    """POST /pooling straight to vLLM: the engine's own request bodies, JSON floats or fp16 bytes."""

    per_mode = False  # the wire does not depend on single/multi

    def __init__(self, name: str, url: str, served_name: str, prompts: PromptBuilder, http: httpx.AsyncClient,
                 encoding: Literal["float", "bytes"], engine: Engine | None = None, task: str = "") -> None:
        self.name = name
        self._url = url.rstrip("/") + POOLING_PATH
        self._prompts, self._http = prompts, http
        self._engine, self._task = engine, task  # pools the rows for the equality check
        wire = pooling_wire_fields("float16") if encoding == "bytes" else {"encoding_format": "float"}
        self._fields = {**wire, **POOLER_CONFIG, "model": served_name}
        self._bytes = encoding == "bytes"

    def request(self, workload: Workload, mode: Mode, indices: list[int]) -> list[bytes]:
        """One /pooling body per image (one conversation per call), one body for all texts."""
        if workload.is_image:
            bodies = [self._prompts.image_body(image) for image in workload.images(indices)]
        else:
            bodies = [PromptBuilder.text_body([workload.token_ids[i] for i in indices])]
        return [orjson.dumps({**body, **self._fields}) for body in bodies]

    async def send(self, bodies: list[bytes]) -> Outcome:
        parts = await asyncio.gather(*(self._one(body) for body in bodies))
        arrays = [a for part in parts for a in part.arrays]
        return Outcome(len(arrays), sum(p.tokens for p in parts), sum(p.wire_bytes for p in parts), arrays)

    async def _one(self, body: bytes) -> Outcome:
        response = await json_post(self._http, self._url, body)
        if self._bytes:
            metadata = response.headers["metadata"]
            arrays, tokens = decode_body(response.content, metadata)
            wire = len(body) + len(response.content) + len(metadata)
        else:
            arrays, tokens = _float_lists(orjson.loads(response.content))
            wire = len(body) + len(response.content)
        return Outcome(len(arrays), tokens, wire, arrays)

    def vectors(self, outcome: Outcome, workload: Workload, mode: Mode) -> list[np.ndarray]:
        """Pool the decoded hidden states with the engine's pooling (for the equality check)."""
        if self._engine is None:
            raise RuntimeError(f"{self.name}: no engine to pool with")
        options = EmbedOptions(task=self._task, role=workload.role, output=OutputKind.of(mode == "multi"))
        return [self._engine.pool(self._task, rows, is_image=workload.is_image, options=options)
                for rows in outcome.arrays]


class EnginePath:
    """The engine in-process (what ``AsyncClient.direct`` runs)."""

    per_mode = True

    def __init__(self, engine: Engine, task: str) -> None:
        self.name = "engine"
        self._engine, self._task = engine, task

    def request(self, workload: Workload, mode: Mode, indices: list[int]) -> tuple[list[Any], EmbedOptions]:
        options = EmbedOptions(task=self._task, role=workload.role, output=OutputKind.of(mode == "multi"))
        return [workload.items[i] for i in indices], options

    async def send(self, request: tuple[list[Any], EmbedOptions]) -> Outcome:
        items, options = request
        result = await self._engine.embed(items, options)
        return Outcome(len(items), result.prompt_tokens, 0, result.embeddings)

    def vectors(self, outcome: Outcome, workload: Workload, mode: Mode) -> list[np.ndarray]:
        return outcome.arrays


class RouterPath:
    """The full router over HTTP through the client's own sender, answering base64 float32."""

    per_mode = True

    def __init__(self, url: str, model: str, task: str, http: httpx.AsyncClient, name: str = "router") -> None:
        self.name = name
        self._sender = RouterSender(url, None, model, timeout=0.0, http=http)  # ``http`` sets the timeouts
        self._task = task

    def request(self, workload: Workload, mode: Mode, indices: list[int]) -> bytes:
        options = EmbedOptions(task=self._task, role=workload.role, output=OutputKind.of(mode == "multi"))
        return self._sender.body([workload.items[i] for i in indices], options)

    async def send(self, body: bytes) -> Outcome:
        response = await self._sender.post(body)
        result = self._sender.result(response)
        return Outcome(len(result.embeddings), result.prompt_tokens, len(body) + len(response.content),
                       result.embeddings)

    def vectors(self, outcome: Outcome, workload: Workload, mode: Mode) -> list[np.ndarray]:
        return outcome.arrays


class ReferencePath:
    """transformers on the unmerged checkpoint, LoRA applied on the fly; blocking, batches of ``batch``."""

    def __init__(self, source: str, task: str, batch: int) -> None:
        from jv4_vllm.oracle.reference import ReferenceEncoder  # torch + transformers: only when this path runs

        self.name = "reference"
        self._encoder = ReferenceEncoder(source, batch_size=batch)
        self._task = task

    def encode(self, workload: Workload, mode: Mode, indices: list[int]) -> list[np.ndarray]:
        multi = mode == "multi"
        if workload.is_image:
            images = [image.data for image in workload.images(indices)]
            out = self._encoder.encode_image(images, task=self._task, return_multivector=multi)
        else:
            out = self._encoder.encode_text(workload.texts(indices), task=self._task, prompt_name=workload.role,
                                            return_multivector=multi)
        return list(out)


def _float_lists(payload: dict[str, Any]) -> tuple[list[np.ndarray], int]:
    """A ``/pooling`` answer with ``encoding_format: float`` (the slow wire the benchmark compares)."""
    arrays = [np.asarray(item["data"], dtype=np.float32) for item in sorted(payload["data"], key=lambda i: i["index"])]
    return arrays, int(payload.get("usage", {}).get("prompt_tokens", 0))
