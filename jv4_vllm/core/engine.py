"""One request in, embeddings out: the core shared by the router and the direct client.

items -> prompts -> token-budget batches per deployment -> ``/pooling`` (raw bytes) ->
pooled / projected vectors, in input order. Everything a client could get wrong is
checked in :meth:`Engine.check` before anything is sent.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from jv4_vllm.core import pooling
from jv4_vllm.core.replicas import BackendResponse, ReplicaPool, ReplicaStats
from jv4_vllm.config import Config
from jv4_vllm.errors import BackendError, InputTooLongError, InvalidRequestError
from jv4_vllm.core.prompts import PromptBuilder
from jv4_vllm.core.spec import TaskSpec, load_task_spec
from jv4_vllm.core.types import EmbedOptions, EmbedResult, ImageInput, Item, TextInput
from jv4_vllm.core.wire import decode_pooling_bytes, pooling_wire_fields

__all__ = ["Engine"]

POOLING_PATH = "/pooling"


@dataclass(slots=True)
class _Call:
    """One /pooling call: which inputs it carries and the request body."""

    indices: list[int]
    body: dict
    is_image: bool


class _TaskRuntime:
    """Per-task state loaded once: spec, prompt builder, replica pool."""

    def __init__(self, spec: TaskSpec, pool: ReplicaPool, request_fields: dict[str, object]) -> None:
        self.spec = spec
        self.prompts = PromptBuilder(spec)
        self.pool = pool
        self.request_fields = request_fields  # what every /pooling call of this task carries


class Engine:
    """Embeds items through the configured vLLM deployments."""

    def __init__(self, config: Config, runtimes: dict[str, _TaskRuntime]) -> None:
        self.config = config
        self.model_name = config.model_name
        self._runtimes = runtimes
        self.tasks = list(runtimes)
        self.max_tokens = min(
            [config.vllm.max_model_len] + [r.spec.max_position_embeddings for r in runtimes.values()]
        )

    @classmethod
    async def start(cls, config: Config) -> "Engine":
        runtimes = {}
        for task, deployment in config.deployments.items():
            spec = load_task_spec(config.task_dir(task))
            if spec.task != task:
                raise ValueError(f"{config.task_dir(task)} holds task {spec.task!r}, not {task!r}")
            fields = {**pooling_wire_fields(config.backend.wire_dtype), "task": "token_embed",
                      "use_activation": False, "model": config.served_name(task)}
            runtimes[task] = _TaskRuntime(spec, ReplicaPool(task, deployment.urls, config.backend), fields)
        engine = cls(config, runtimes)
        await asyncio.gather(*(r.pool.start() for r in runtimes.values()))
        return engine

    async def aclose(self) -> None:
        await asyncio.gather(*(r.pool.aclose() for r in self._runtimes.values()))

    # -- introspection -------------------------------------------------------------
    def readiness(self) -> dict[str, bool]:
        return {task: r.pool.healthy() for task, r in self._runtimes.items()}

    def replica_stats(self) -> list[ReplicaStats]:
        return [s for r in self._runtimes.values() for s in r.pool.stats()]

    def matryoshka_dims(self, task: str) -> list[int]:
        return list(self._runtime(task).spec.matryoshka_dims)

    def projector_dim(self, task: str) -> int:
        return self._runtime(task).spec.projector_dim

    def _runtime(self, task: str) -> _TaskRuntime:
        try:
            return self._runtimes[task]
        except KeyError:
            raise InvalidRequestError(
                f"unknown task {task!r}; this service serves {self.tasks}", param="task") from None

    # -- validation and planning ----------------------------------------------------
    def check(self, items: Sequence[Item], options: EmbedOptions) -> None:
        """Raise InvalidRequestError for anything wrong with the request; sends nothing."""
        self._plan(items, options)

    def _check_options(self, runtime: _TaskRuntime, options: EmbedOptions) -> None:
        if options.multivector and options.dimensions is not None:
            raise InvalidRequestError(
                "dimensions cannot be combined with return_multivector (multi-vectors are "
                f"{runtime.spec.projector_dim}-d)", param="dimensions")
        if options.dimensions is not None and options.dimensions not in runtime.spec.matryoshka_dims:
            raise InvalidRequestError(
                f"dimensions={options.dimensions} is not supported; use one of "
                f"{list(runtime.spec.matryoshka_dims)}", param="dimensions")
        if options.role not in runtime.spec.prefixes:
            raise InvalidRequestError(f"unknown role {options.role!r}", param="task")

    def _plan(self, items: Sequence[Item], options: EmbedOptions) -> list[_Call]:
        runtime = self._runtime(options.task)
        self._check_options(runtime, options)
        if not items:
            raise InvalidRequestError("input is empty; send at least one text or image", param="input")
        text_indices: list[int] = []
        calls: list[_Call] = []
        for index, item in enumerate(items):
            if isinstance(item, TextInput):
                if not item.text or not item.text.strip():
                    raise InvalidRequestError(f"input[{index}] is an empty string", param=f"input[{index}]")
                if not item.text.isascii():  # JSON can carry lone surrogates; no tokenizer takes them
                    try:
                        item.text.encode("utf-8")
                    except UnicodeEncodeError as exc:
                        raise InvalidRequestError(
                            f"input[{index}] is not valid Unicode text (lone surrogate at position {exc.start})",
                            param=f"input[{index}]") from None
                text_indices.append(index)
            elif isinstance(item, ImageInput):
                calls.append(_Call([index], runtime.prompts.image_body(item), True))
            else:
                raise InvalidRequestError(f"input[{index}] is neither text nor image", param=f"input[{index}]")
        texts = [items[i].text for i in text_indices]  # type: ignore[union-attr]
        token_ids = runtime.prompts.tokenize_texts(texts, options.role) if texts else []
        for index, ids in zip(text_indices, token_ids):
            if len(ids) > self.max_tokens and not options.truncate:
                raise InputTooLongError(
                    f"input[{index}] has {len(ids)} tokens, more than the maximum {self.max_tokens}; "
                    "shorten it or send truncate=true", param=f"input[{index}]")
        token_ids = [ids[: self.max_tokens] for ids in token_ids]
        return self._text_calls(text_indices, token_ids) + calls

    def _text_calls(self, indices: list[int], token_ids: list[list[int]]) -> list[_Call]:
        """Pack texts into /pooling calls bounded by a token budget and an item count."""
        budget, max_items = self.config.backend.max_batch_tokens, self.config.backend.max_batch_items
        calls: list[_Call] = []
        batch: list[int] = []
        batch_ids: list[list[int]] = []
        used = 0
        for index, ids in zip(indices, token_ids):
            if batch and (used + len(ids) > budget or len(batch) >= max_items):
                calls.append(_Call(batch, PromptBuilder.text_body(batch_ids), False))
                batch, batch_ids, used = [], [], 0
            batch.append(index)
            batch_ids.append(ids)
            used += len(ids)
        if batch:
            calls.append(_Call(batch, PromptBuilder.text_body(batch_ids), False))
        return calls

    # -- execution ------------------------------------------------------------------
    async def embed(self, items: Sequence[Item], options: EmbedOptions) -> EmbedResult:
        calls = self._plan(items, options)
        runtime = self._runtimes[options.task]
        results: list[np.ndarray | None] = [None] * len(items)
        tokens = 0

        async def run(call: _Call) -> None:
            nonlocal tokens
            rows_list, used = await self._send(runtime, call, options)
            tokens += used
            for index, rows in zip(call.indices, rows_list):
                results[index] = self._pool(runtime, rows, call.is_image, options)

        try:
            async with asyncio.TaskGroup() as group:  # one failure cancels the rest
                for call in calls:
                    group.create_task(run(call))
        except ExceptionGroup as failure:
            raise failure.exceptions[0] from None
        return EmbedResult(embeddings=[r for r in results if r is not None], prompt_tokens=tokens)

    async def _send(self, runtime: _TaskRuntime, call: _Call, options: EmbedOptions) -> tuple[list[np.ndarray], int]:
        response = await runtime.pool.post(POOLING_PATH, {**call.body, **runtime.request_fields})
        if response.status >= 400:
            raise self._vllm_error(response, call)
        if response.metadata is None:
            raise BackendError("the backend answered without the metadata header of a bytes response")
        rows_list, used = decode_pooling_bytes(response.content, response.metadata)
        if len(rows_list) != len(call.indices):
            raise BackendError(f"the backend returned {len(rows_list)} results for {len(call.indices)} inputs")
        return rows_list, used or sum(r.shape[0] for r in rows_list)

    @staticmethod
    def _vllm_error(response: BackendResponse, call: _Call) -> Exception:
        where = ", ".join(f"input[{i}]" for i in call.indices[:8])
        if response.status in (400, 413, 422):  # about the input; 401/404 mean a misconfigured deployment
            kind = "the image" if call.is_image else "the input"
            return InvalidRequestError(f"{where}: the model rejected {kind}: {response.error_message()}",
                                       param=f"input[{call.indices[0]}]")
        return BackendError(f"{where}: backend error {response.status}")

    def pool(self, task: str, rows: np.ndarray, *, is_image: bool, options: EmbedOptions) -> np.ndarray:
        """One input's hidden states -> its embedding, as :meth:`embed` pools them (for rows fetched elsewhere)."""
        return self._pool(self._runtime(task), rows, is_image, options)

    @staticmethod
    def _pool(runtime: _TaskRuntime, rows: np.ndarray, is_image: bool, options: EmbedOptions) -> np.ndarray:
        spec = runtime.spec
        if options.multivector:
            return pooling.multi_vector(rows, spec.projector_weight, spec.projector_bias)
        start, stop = runtime.prompts.vision_span(rows.shape[0]) if is_image else (0, None)
        return pooling.single_vector(rows, start=start, stop=stop, dim=options.dimensions,
                                     allowed_dims=spec.matryoshka_dims)
