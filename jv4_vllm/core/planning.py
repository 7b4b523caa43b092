"""A request's plan: which ``/pooling`` calls to make and where each returned row goes.

Planning is where every client mistake is found (bad options, empty or over-long inputs),
before anything is sent. Texts are tokenised here (only as far as needed, in a worker
thread when long) and packed into calls by a token budget; each image is its own call.
Every output (one input, or all inputs of a late-chunked document) gets a
:class:`~jv4_vllm.core.folds.SpanFold` that the calls' rows stream into.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from jv4_vllm.config import Config
from jv4_vllm.core.folds import SpanFold, WindowSink
from jv4_vllm.core.prompts import PromptBuilder
from jv4_vllm.core.stream import RowSink
from jv4_vllm.core.types import EmbedOptions, ImageInput, Item, OutputKind, TextInput
from jv4_vllm.errors import BackendError, InputTooLongError, InvalidRequestError

if TYPE_CHECKING:
    from jv4_vllm.core.engine import TaskRuntime

__all__ = ["Call", "Output", "Plan", "Planner"]

INLINE_TOKENIZE_CHARS = 16_384  # more text than this is tokenised in a worker thread
SinkFactory = Callable[[int], RowSink]  # given the rows vLLM returned for a prompt


@dataclass(slots=True)
class Output:
    """One fold's results: ``inputs[k]`` is the input that span ``k`` answers."""

    inputs: list[int]
    single: bool
    multi: bool
    fold: SpanFold | None = None
    rows: int = 0


@dataclass(slots=True)
class Call:
    """One /pooling call: its prompts' body, its token cost, and a sink factory per prompt."""

    body: dict[str, Any]
    tokens: int
    sinks: list[SinkFactory]
    inputs: list[int]
    is_image: bool


@dataclass(slots=True)
class Plan:
    calls: list[Call]
    outputs: list[Output]
    inputs: int
    tokens: int = field(default=0)


class Planner:
    """Turns items and options into a :class:`Plan` for one task."""

    def __init__(self, config: Config, max_tokens: int) -> None:
        self.config = config
        self.max_tokens = max_tokens

    async def plan(self, runtime: TaskRuntime, items: Sequence[Item], options: EmbedOptions) -> Plan:
        self._check_options(runtime, options)
        if not items:
            raise InvalidRequestError("input is empty; send at least one text or image", param="input")
        texts: list[tuple[int, str]] = []
        images: list[tuple[int, ImageInput]] = []
        for index, item in enumerate(items):
            if isinstance(item, TextInput):
                _check_text(index, item.text)
                texts.append((index, item.text))
            elif isinstance(item, ImageInput):
                images.append((index, item))
            else:
                raise InvalidRequestError.about(index, "is neither text nor image", sep=" ")
        want_single, want_multi = options.output.single, options.output.multi
        if options.late_chunking:
            if images:
                index = images[0][0]
                raise InvalidRequestError.about(index, "late chunking takes texts only, not images")
            return await self._late_chunking_plan(runtime, [t for _, t in texts], options, want_single, want_multi)
        plan = Plan(calls=[], outputs=[], inputs=len(items))
        if texts:
            ids = await self._tokenize(runtime.prompts, [t for _, t in texts], options)
            self._text_calls(runtime, plan, [i for i, _ in texts], ids, options.truncate, want_single, want_multi)
        for index, image in images:
            output = Output(inputs=[index], single=want_single, multi=want_multi)
            plan.outputs.append(output)
            tokens = runtime.prompts.image_tokens(image)
            plan.calls.append(Call(runtime.prompts.image_body(image), tokens, [self._image_sink(runtime, output)],
                                   [index], True))
            plan.tokens += tokens
        return plan

    def _check_options(self, runtime: TaskRuntime, options: EmbedOptions) -> None:
        spec = runtime.spec
        if options.output is OutputKind.MULTI and options.dimensions is not None:
            raise InvalidRequestError(
                f"dimensions cannot be combined with return_multivector (multi-vectors are {spec.projector_dim}-d)",
                param="dimensions")
        if options.dimensions is not None and options.dimensions not in spec.matryoshka_dims:
            raise InvalidRequestError(
                f"dimensions={options.dimensions} is not supported; use one of {list(spec.matryoshka_dims)}",
                param="dimensions")
        if options.pool_factor is not None:
            if options.pool_factor < 1:
                raise InvalidRequestError(f"multivector_pool_factor must be at least 1, got {options.pool_factor}",
                                          param="multivector_pool_factor")
            if not options.output.multi:
                raise InvalidRequestError("multivector_pool_factor pools multi-vector rows: send it with "
                                          "return_multivector", param="multivector_pool_factor")
        if options.role not in spec.prefixes:
            raise InvalidRequestError(f"unknown role {options.role!r}", param="task")

    async def _tokenize(self, prompts: PromptBuilder, texts: list[str], options: EmbedOptions) -> list[list[int]]:
        """Each text's prompt ids, at most ``max_tokens + 1`` of them (more means too long)."""
        if sum(len(t) for t in texts) > INLINE_TOKENIZE_CHARS:
            return await asyncio.to_thread(prompts.tokenize_capped, texts, options.role, self.max_tokens)
        return prompts.tokenize_capped(texts, options.role, self.max_tokens)

    def _text_calls(self, runtime: TaskRuntime, plan: Plan, indices: list[int], token_ids: list[list[int]],
                    truncate: bool, single: bool, multi: bool) -> None:
        """One output per text; texts packed into calls bounded by a token budget and an item count."""
        limit = self.max_tokens
        budget, max_items = self.config.backend.max_batch_tokens, self.config.backend.max_batch_items
        batch: list[tuple[int, list[int], SinkFactory]] = []
        used = 0

        def flush() -> None:
            if batch:
                body = PromptBuilder.text_body([ids for _, ids, _ in batch])
                plan.calls.append(Call(body, sum(len(ids) for _, ids, _ in batch), [s for _, _, s in batch],
                                       [i for i, _, _ in batch], False))

        for index, ids in zip(indices, token_ids):
            if len(ids) > limit:
                if not truncate:
                    raise InputTooLongError.about(
                        index, f"has more than the maximum of {limit} tokens; shorten it or send truncate=true",
                        sep=" ")
                ids = ids[:limit]
            output = Output(inputs=[index], single=single, multi=multi, rows=len(ids))
            output.fold = _fold(runtime, output, [(0, len(ids))], [(0, len(ids))])
            plan.outputs.append(output)
            if batch and (used + len(ids) > budget or len(batch) >= max_items):
                flush()
                batch, used = [], 0
            batch.append((index, ids, _fixed_sink(output.fold, len(ids))))
            used += len(ids)
            plan.tokens += len(ids)
        flush()

    async def _late_chunking_plan(self, runtime: TaskRuntime, texts: list[str], options: EmbedOptions,
                                  single: bool, multi: bool) -> Plan:
        from jv4_vllm.core.late_chunking import plan_late_chunking

        prefix = runtime.spec.prefixes[options.role]
        overlap = self.config.backend.late_chunking_overlap
        chunked = await asyncio.to_thread(plan_late_chunking, runtime.prompts.tokenizer, prefix, texts,
                                          max_tokens=self.max_tokens, truncate=options.truncate, overlap=overlap)
        output = Output(inputs=list(range(len(texts))), single=single, multi=multi, rows=len(chunked.token_ids))
        output.fold = _fold(runtime, output, chunked.spans, chunked.spans)
        plan = Plan(calls=[], outputs=[output], inputs=len(texts))
        for start, stop, keep_from in chunked.windows:
            sink = _fixed_sink(output.fold, stop - start, offset=start, keep_from=keep_from)
            body = PromptBuilder.text_body([chunked.token_ids[start:stop]])
            plan.calls.append(Call(body, stop - start, [sink], list(range(len(texts))), False))
            plan.tokens += stop - start
        return plan

    def fold_for(self, runtime: TaskRuntime, output: Output, rows: int, is_image: bool) -> SpanFold:
        """The fold of one whole prompt of ``rows`` tokens (an image pools its vision span)."""
        single_span = runtime.prompts.vision_span(rows) if is_image else (0, rows)
        output.fold = _fold(runtime, output, [single_span], [(0, rows)])
        output.rows = rows
        return output.fold

    def _image_sink(self, runtime: TaskRuntime, output: Output) -> SinkFactory:
        def make(rows: int) -> RowSink:
            try:
                return WindowSink(self.fold_for(runtime, output, rows, is_image=True))
            except ValueError as exc:
                raise BackendError.about(output.inputs[0], f"the backend's answer is malformed ({exc})") from None
        return make


def _fold(runtime: TaskRuntime, output: Output, single_spans: Sequence[tuple[int, int]],
          multi_spans: Sequence[tuple[int, int]]) -> SpanFold:
    return SpanFold(single_spans if output.single else (), multi_spans if output.multi else (),
                    runtime.projector if output.multi else None)


def _fixed_sink(fold: SpanFold, expected: int, *, offset: int = 0, keep_from: int = 0) -> SinkFactory:
    """A sink for a prompt whose length we know: vLLM must return one row per token."""
    def make(rows: int) -> RowSink:
        if rows != expected:
            raise BackendError(f"the backend returned {rows} rows for a prompt of {expected} tokens")
        return WindowSink(fold, offset=offset, keep_from=keep_from)
    return make


def _check_text(index: int, text: str) -> None:
    if not text or not text.strip():
        raise InvalidRequestError.about(index, "is an empty string", sep=" ")
    if not text.isascii():  # JSON can carry lone surrogates; no tokenizer takes them
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequestError.about(
                index, f"is not valid Unicode text (lone surrogate at position {exc.start})", sep=" ") from None
