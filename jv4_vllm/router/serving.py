"""The work behind the routes: read a request's inputs, run the engine, render the response.

:mod:`jv4_vllm.router.protocol` only declares and checks shapes; everything that does I/O
or bulk work lives here. Rendering hands numpy arrays to orjson (no per-float Python) and
runs in a worker thread, like every other bulk step, so the event loop stays free.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

from jv4_vllm.config import LimitsConfig
from jv4_vllm.core.images import load_image
from jv4_vllm.core.types import EmbedResult, Item, TextInput
from jv4_vllm.core.wire import EmbeddingType, encode_multivector, encode_vector
from jv4_vllm.errors import Jv4Error, PayloadTooLargeError
from jv4_vllm.router.protocol import BytesObject, EmbeddingsRequest, ImageObject, TextObject, UrlObject

__all__ = ["render_embeddings", "request_items"]

IMAGE_LOAD_CONCURRENCY = 8


async def request_items(body: EmbeddingsRequest, limits: LimitsConfig) -> list[Item]:
    """The inputs as engine items, images read and checked; too many inputs is a 413."""
    raw = [body.input] if isinstance(body.input, str) else body.input
    if len(raw) > limits.max_inputs_per_request:
        raise PayloadTooLargeError(
            f"input has {len(raw)} items; the limit is {limits.max_inputs_per_request} per request",
            param="input", code="too_many_inputs")
    return await _items(raw, limits)


def _image_source(value: object) -> str | None:
    """The image string of an image item in any of its spellings; None for texts."""
    if isinstance(value, ImageObject):
        return value.image
    if isinstance(value, UrlObject):
        return value.url
    if isinstance(value, BytesObject):
        return value.bytes
    return None


async def _items(raw: Sequence[str | TextObject | ImageObject | UrlObject | BytesObject],
                 limits: LimitsConfig) -> list[Item]:
    """Texts as they are; images read concurrently. A failure reports the lowest failing index."""
    sources = [_image_source(value) for value in raw]
    items: list[Item | None] = [
        None if source is not None else TextInput(value if isinstance(value, str) else value.text)  # type: ignore[union-attr]
        for value, source in zip(raw, sources)
    ]
    images = [(i, source) for i, source in enumerate(sources) if source is not None]
    if not images:
        return items  # type: ignore[return-value]
    gate = asyncio.Semaphore(IMAGE_LOAD_CONCURRENCY)
    failures: dict[int, Jv4Error] = {}

    async def read(index: int, value: str) -> None:
        async with gate:
            try:
                items[index] = await load_image(value, limits, index)
            except Jv4Error as exc:
                failures[index] = exc

    await asyncio.gather(*(read(i, v) for i, v in images))
    if failures:
        raise failures[min(failures)]
    return items  # type: ignore[return-value]


def render_embeddings(result: EmbedResult, *, model: str, embedding_type: EmbeddingType,
                      multivector: bool) -> bytes:
    """The JSON body for ``result`` (CPU-bound: call it from a worker thread)."""
    item, arrays = (_multivector_item if multivector else _vector_item), result.embeddings
    if result.multivectors is not None:  # dense and multi-vector from one pass
        item, arrays = _both_item, list(zip(result.multivectors, result.embeddings))  # type: ignore[assignment]
    data = [item(index, array, embedding_type) for index, array in enumerate(arrays)]
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return orjson.dumps({"object": "list", "model": model, "data": data, "usage": usage},
                        option=orjson.OPT_SERIALIZE_NUMPY)


def _vector_item(index: int, vector: np.ndarray, embedding_type: EmbeddingType) -> dict[str, Any]:
    embedding = (np.ascontiguousarray(vector, dtype=np.float32) if embedding_type == "float"
                 else encode_vector(vector, embedding_type))
    return {"object": "embedding", "index": index, "embedding": embedding}


def _multivector_item(index: int, matrix: np.ndarray, embedding_type: EmbeddingType) -> dict[str, Any]:
    fields = ({"embeddings": np.ascontiguousarray(matrix, dtype=np.float32)} if embedding_type == "float"
              else encode_multivector(matrix, embedding_type))
    return {"object": "embeddings", "index": index, **fields}


def _both_item(index: int, pair: tuple[np.ndarray, np.ndarray], embedding_type: EmbeddingType) -> dict[str, Any]:
    """A multi-vector item that also carries the input's single vector as ``embedding``."""
    matrix, vector = pair
    return {**_multivector_item(index, matrix, embedding_type),
            "embedding": _vector_item(index, vector, embedding_type)["embedding"]}
