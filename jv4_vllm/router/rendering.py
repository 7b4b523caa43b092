"""Embedding responses rendered as a sequence of chunks, so no response exists whole in memory.

A long document's multi-vector answer is large: a million 128-d rows are over a gigabyte of
JSON floats. :func:`render_chunks` yields the body piece by piece (an item at a time, and a
multi-vector item's rows a block at a time, as JSON floats or as base64 of whole rows), and the
router sends each chunk before it renders the next. Numpy arrays go to orjson whole-block
(no per-float Python). Rendering is CPU-bound: large responses are iterated in worker threads.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import orjson

from jv4_vllm.core.page_layout import PageLayout
from jv4_vllm.core.types import EmbedResult, OutputKind
from jv4_vllm.core.wire import EmbeddingType, encode_multivector, encode_vector

__all__ = ["ROWS_PER_CHUNK", "render_chunks", "render_embeddings"]

ROWS_PER_CHUNK = 3 * 1024  # a multiple of 3: the base64 of this many float32 rows splits at whole characters
_NUMPY = orjson.OPT_SERIALIZE_NUMPY
Chunks = Iterator[bytes]


def render_embeddings(result: EmbedResult, *, model: str, embedding_type: EmbeddingType, output: OutputKind,
                      pages: Mapping[int, Sequence[int]] | None = None) -> bytes:
    """The whole body at once (small responses, tests)."""
    return b"".join(render_chunks(result, model=model, embedding_type=embedding_type, output=output, pages=pages))


def render_chunks(result: EmbedResult, *, model: str, embedding_type: EmbeddingType, output: OutputKind,
                  pages: Mapping[int, Sequence[int]] | None = None) -> Chunks:
    """The JSON body for ``result``, in chunks; ``data[i]`` answers ``input[i]``.

    ``pages`` (:attr:`~jv4_vllm.router.serving.RequestItems.pages`) groups the page vectors of each
    PDF input into one ``{"object": "pages", "index", "pages": [{"page", ...}]}`` item.
    """
    item: Callable[[dict[str, Any], Any, EmbeddingType], Chunks]
    item, arrays = (_multivector_item if output is OutputKind.MULTI else _vector_item), result.embeddings
    if output is OutputKind.BOTH:  # dense and multi-vector from one pass
        item, arrays = _both_item, list(zip(result.multivectors or (), result.embeddings))  # type: ignore[assignment]
    yield b'{"object":"list","model":' + orjson.dumps(model) + b',"data":['
    for position, chunks in enumerate(_items(arrays, pages or {}, item, embedding_type)):
        if position:
            yield b","
        yield from chunks
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    yield b'],"usage":' + orjson.dumps(usage) + b"}"


def _items(arrays: Sequence[Any], pages: Mapping[int, Sequence[int]],
           item: Callable[[dict[str, Any], Any, EmbeddingType], Chunks],
           embedding_type: EmbeddingType) -> Iterator[Chunks]:
    for span in PageLayout.of_flat(len(arrays), pages).spans():
        if span.pages is None:
            yield item({"index": span.index}, arrays[span.start], embedding_type)
        else:
            yield _pages_item(span.index, [item({"page": n}, array, embedding_type)
                                           for n, array in zip(span.pages, arrays[span.start:span.stop])])


def _pages_item(index: int, entries: list[Chunks]) -> Chunks:
    yield b'{"object":"pages","index":' + str(index).encode() + b',"pages":['
    for position, chunks in enumerate(entries):
        if position:
            yield b","
        yield from chunks
    yield b"]}"


def _vector_fields(vector: np.ndarray, embedding_type: EmbeddingType) -> Any:
    return (np.ascontiguousarray(vector, dtype=np.float32) if embedding_type == "float"
            else encode_vector(vector, embedding_type))


def _vector_item(head: dict[str, Any], vector: np.ndarray, embedding_type: EmbeddingType) -> Chunks:
    yield orjson.dumps({"object": "embedding", **head, "embedding": _vector_fields(vector, embedding_type)},
                       option=_NUMPY)


def _multivector_item(head: dict[str, Any], matrix: np.ndarray, embedding_type: EmbeddingType,
                      extra: dict[str, Any] | None = None) -> Chunks:
    fields = {"object": "embeddings", **head, **(extra or {})}
    if embedding_type == "float":
        return _streamed(fields, _float_rows(matrix))
    if embedding_type == "base64":
        return _streamed({**fields, "shape": list(matrix.shape)}, _base64_rows(matrix))
    return iter([orjson.dumps({**fields, **encode_multivector(matrix, embedding_type)}, option=_NUMPY)])


def _both_item(head: dict[str, Any], pair: tuple[np.ndarray, np.ndarray], embedding_type: EmbeddingType) -> Chunks:
    """A multi-vector item that also carries the input's single vector as ``embedding``."""
    matrix, vector = pair
    return _multivector_item(head, matrix, embedding_type, {"embedding": _vector_fields(vector, embedding_type)})


def _streamed(fields: dict[str, Any], embeddings: Iterable[bytes]) -> Chunks:
    """``fields`` as a JSON object whose last member, ``embeddings``, comes from a chunk stream."""
    yield orjson.dumps(fields, option=_NUMPY)[:-1] + b',"embeddings":'
    yield from embeddings
    yield b"}"


def _float_rows(matrix: np.ndarray) -> Chunks:
    yield b"["
    for start in range(0, matrix.shape[0], ROWS_PER_CHUNK):
        block = orjson.dumps(np.ascontiguousarray(matrix[start:start + ROWS_PER_CHUNK], dtype=np.float32),
                             option=_NUMPY)
        yield (b"," if start else b"") + block[1:-1]
    yield b"]"


def _base64_rows(matrix: np.ndarray) -> Chunks:
    """One base64 string of the row-major little-endian float32 matrix, a block of rows at a time."""
    yield b'"'
    for start in range(0, matrix.shape[0], ROWS_PER_CHUNK):
        yield base64.b64encode(np.ascontiguousarray(matrix[start:start + ROWS_PER_CHUNK], dtype="<f4").tobytes())
    yield b'"'
