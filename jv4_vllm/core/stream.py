"""Fold a vLLM ``/pooling`` bytes body into results while it arrives.

vLLM answers ``encoding_format: bytes`` with a ``metadata`` header that gives, for every
prompt, its dtype, byte range and shape, then a body of raw rows. :class:`BodyFolder` reads
the header first, then takes body chunks as they come and hands whole rows (float32: fp32 as
views of the chunk, fp16 and bf16 widened one chunk at a time) to each prompt's :class:`RowSink`. So the router holds at most
one slab and one partial row per call, never a request's whole hidden states.
:func:`decode_body` reads a whole body at once with the same parser (the benchmark's raw vLLM
path and tests, which hold the body anyway).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from jv4_vllm.core.wire import bf16_to_float32, fp16_to_float32
from jv4_vllm.errors import BackendError

__all__ = ["BodyFolder", "PromptLayout", "RowSink", "decode_body", "parse_metadata", "widen"]

_DTYPES = {"float16": 2, "bfloat16": 2, "float32": 4}


class RowSink(Protocol):
    """Receives one prompt's rows in order: ``rows`` are float32, the first is row ``start``."""

    def feed(self, start: int, rows: np.ndarray) -> None: ...

    def withdraw(self) -> None:
        """Undo every feed: the call broke off and will be sent again."""


@dataclass(frozen=True, slots=True)
class PromptLayout:
    """Where one prompt's rows lie in the body."""

    index: int
    dtype: str
    big_endian: bool
    start: int
    end: int
    rows: int
    width: int

    @property
    def row_bytes(self) -> int:
        return self.width * _DTYPES[self.dtype]


def parse_metadata(header: str | None, prompts: int) -> tuple[list[PromptLayout], int]:
    """The layouts (in body order) and prompt tokens of a bytes response; BackendError if malformed."""
    if header is None:
        raise BackendError("the backend answered without the metadata header of a bytes response")
    try:
        meta: Any = json.loads(header)
        layouts = [_layout(item) for item in meta["data"]]
        tokens = int((meta.get("usage") or {}).get("prompt_tokens") or 0)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BackendError(f"the backend's metadata header is malformed ({type(exc).__name__}: {exc})") from None
    if sorted(layout.index for layout in layouts) != list(range(prompts)):
        raise BackendError(f"the backend returned {len(layouts)} results for {prompts} prompts")
    layouts.sort(key=lambda layout: layout.start)
    position = 0
    for layout in layouts:
        if layout.start < position or layout.end - layout.start != layout.rows * layout.row_bytes:
            raise BackendError(f"the backend's byte ranges do not match its shapes (prompt {layout.index})")
        position = layout.end
    return layouts, tokens or sum(layout.rows for layout in layouts)


def _layout(item: dict[str, Any]) -> PromptLayout:
    dtype = item["embed_dtype"]
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported embed_dtype {dtype!r}")
    shape = [int(n) for n in item["shape"]]
    if len(shape) != 2 or min(shape) < 0:
        raise ValueError(f"shape {shape} is not [tokens, hidden]")
    return PromptLayout(index=int(item["index"]), dtype=dtype, big_endian=item.get("endianness") == "big",
                        start=int(item["start"]), end=int(item["end"]), rows=shape[0], width=shape[1])


def widen(raw: bytes | bytearray | memoryview, layout: PromptLayout) -> np.ndarray:
    """Whole rows of raw bytes as a float32 [n, width] array: fp32 as a view (no copy), fp16 and
    bf16 widened (one slab at a time, so the copy is bounded by the slab)."""
    order = ">" if layout.big_endian else "<"
    if layout.dtype == "bfloat16":
        flat = bf16_to_float32(np.frombuffer(raw, dtype=f"{order}u2"))
    elif layout.dtype == "float16":
        flat = fp16_to_float32(np.frombuffer(raw, dtype=f"{order}i2"))
    else:
        flat = np.frombuffer(raw, dtype=f"{order}f4")
    return flat.reshape(-1, layout.width)


def decode_body(body: bytes, header: str | None) -> tuple[list[np.ndarray], int]:
    """A whole bytes body: each prompt's rows as float32 [tokens, hidden], in prompt order, and the
    prompt tokens. The prompt count is the header's; its ranges are checked as when streaming."""
    try:
        prompts = len(json.loads(header or "")["data"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BackendError(f"the backend's metadata header is malformed ({type(exc).__name__}: {exc})") from None
    layouts, tokens = parse_metadata(header, prompts)
    if max((layout.end for layout in layouts), default=0) > len(body):
        raise BackendError("the backend's body ended before the rows its metadata announces")
    arrays: list[np.ndarray] = [np.empty(0)] * prompts
    view = memoryview(body)
    for layout in layouts:
        arrays[layout.index] = widen(view[layout.start:layout.end], layout)
    return arrays, tokens


class BodyFolder:
    """Splits a body stream into whole rows per prompt and feeds each prompt's sink.

    ``take(chunk)`` does the widening and folding (call it in a worker thread for large
    chunks); ``finish()`` checks that every prompt got all its rows.
    """

    def __init__(self, layouts: list[PromptLayout], sinks: dict[int, RowSink]) -> None:
        self._layouts = layouts
        self._sinks = sinks
        self._position = 0  # body bytes seen
        self._pending = bytearray()  # the start of a row cut by a chunk boundary
        self._current = 0  # index into layouts
        self._fed_rows = [0] * len(layouts)

    def take(self, chunk: bytes | bytearray | memoryview) -> None:
        """Feed ``chunk`` (the next bytes of the body) into the sinks, whole rows at a time."""
        view = memoryview(chunk).cast("B")
        while view.nbytes:
            while self._current < len(self._layouts) and self._layouts[self._current].rows == 0:
                self._current += 1
            if self._current >= len(self._layouts):
                raise BackendError("the backend's body is longer than its metadata says")
            layout = self._layouts[self._current]
            if self._position < layout.start:  # padding between prompts
                skip = min(layout.start - self._position, view.nbytes)
                view, self._position = view[skip:], self._position + skip
                continue
            piece, view = view[:layout.end - self._position], view[layout.end - self._position:]
            self._position += piece.nbytes
            self._feed(layout, piece)
            if self._position == layout.end:
                self._current += 1

    def _feed(self, layout: PromptLayout, piece: memoryview) -> None:
        data: bytes | bytearray | memoryview = piece
        if self._pending:  # the tail of a row cut by the previous chunk
            self._pending += piece
            data = self._pending
        whole = len(data) // layout.row_bytes * layout.row_bytes
        if whole:
            slot = self._current
            rows = widen(data[:whole], layout)
            self._sinks[layout.index].feed(self._fed_rows[slot], rows)
            self._fed_rows[slot] += rows.shape[0]
        self._pending = bytearray(data[whole:])

    def finish(self) -> None:
        """BackendError unless every prompt received exactly its rows."""
        if self._pending:
            raise BackendError("the backend's body ends mid-row")
        for layout, fed in zip(self._layouts, self._fed_rows):
            if fed != layout.rows:
                raise BackendError(f"the backend's body ended early: prompt {layout.index} got {fed} of "
                                   f"{layout.rows} rows")
