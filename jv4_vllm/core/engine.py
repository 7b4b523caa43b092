"""One request in, embeddings out: the core shared by the router and the direct client.

items -> a plan (prompts, token-budget calls, one pooling fold per output) -> admission of
the whole request in tokens -> ``/pooling`` calls whose bytes bodies are folded into the
results as they stream in -> vectors in input order. Everything a client could get wrong
is found while planning, before anything is sent; tokenising long inputs and folding
large bodies run in worker threads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import aiohttp
import numpy as np

from jv4_vllm.config import Config
from jv4_vllm.core.admission import CallMeter, TokenBudget
from jv4_vllm.core.concurrency import all_or_first_error
from jv4_vllm.core.fleet import Fleet
from jv4_vllm.core.folds import Projector, WindowSink
from jv4_vllm.core.planning import Call, Output, Plan, Planner
from jv4_vllm.core.pooler_contract import POOLER_CONFIG, POOLING_PATH
from jv4_vllm.core.prompts import PromptBuilder
from jv4_vllm.core.replicas import BackendRejection, ReplicaPool, ReplicaStats
from jv4_vllm.core.spec import TaskSpec, load_task_spec
from jv4_vllm.core.stream import BodyFolder, RowSink, parse_metadata
from jv4_vllm.core.token_pooling import pool_rows
from jv4_vllm.core.types import EmbedOptions, EmbedResult, Item, OutputKind
from jv4_vllm.core.wire import pooling_wire_fields
from jv4_vllm.errors import BackendError, InvalidRequestError, PayloadTooLargeError

__all__ = ["Engine", "TaskRuntime"]

SLAB_BYTES = 1 << 20  # body bytes folded at a time (the most a call holds besides its results)
# Bodies up to this size are folded on the event loop, a slab (a few ms) at a time: a worker-thread hop
# per slab cost the router about 20% of its throughput on short passages (measured on the replay
# upstream). Longer bodies (long documents) are folded in worker threads.
INLINE_BODY_BYTES = 2 << 20
INLINE_FINISH_ROWS = 4096  # results with more rows than this are finished in a worker thread
TEXT_MAX_TOKENS = 32768  # jina-embeddings-v4's own encoder never keeps more text tokens than this


class TaskRuntime:
    """Per-task state loaded once: spec, prompt builder, projector, replica pool, token budget."""

    def __init__(self, spec: TaskSpec, config: Config, fleet: Fleet | None = None) -> None:
        self.spec = spec
        self.prompts = PromptBuilder(spec)
        self.projector = Projector(spec.projector_weight, spec.projector_bias)
        settings = config.backend
        self.budget = TokenBudget(spec.task, settings.tokens_in_flight_per_replica, settings.max_queue,
                                  lambda: self.pool.healthy_count(), fleet.size if fleet is not None else lambda: 1)
        if fleet is not None:
            fleet.subscribe(self.budget.wake)  # a router left: its share is ours to admit now
        self.pool = ReplicaPool(spec.task, config.deployments[spec.task].urls, settings,
                                on_change=self.budget.wake)
        # what every /pooling call of this task carries besides its prompts
        self.request_fields = {**pooling_wire_fields(settings.wire_dtype), **POOLER_CONFIG,
                               "model": config.served_name(spec.task)}


class Engine:
    """Embeds items through the configured vLLM deployments."""

    def __init__(self, config: Config, runtimes: dict[str, TaskRuntime]) -> None:
        self.config = config
        self.model_name = config.model_name
        self._runtimes = runtimes
        self.tasks = list(runtimes)
        self.max_tokens = min(
            [config.vllm.max_model_len, TEXT_MAX_TOKENS] + [r.spec.max_position_embeddings for r in runtimes.values()]
        )
        overlap = config.backend.late_chunking_overlap
        if overlap >= self.max_tokens:
            raise ValueError(f"backend.late_chunking_overlap ({overlap}) must be smaller than the window of "
                             f"{self.max_tokens} tokens (vllm.max_model_len)")
        self._planner = Planner(config, self.max_tokens)

    @classmethod
    async def start(cls, config: Config, fleet: Fleet | None = None) -> "Engine":
        """Load every task and reach its replicas; ``fleet``: the routers this engine shares budgets with."""
        runtimes = {}
        for task in config.deployments:
            spec = load_task_spec(config.task_dir(task))
            if spec.task != task:
                raise ValueError(f"{config.task_dir(task)} holds task {spec.task!r}, not {task!r}")
            runtimes[task] = TaskRuntime(spec, config, fleet)
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

    def admission_stats(self) -> dict[str, tuple[int, int]]:
        """Per task: (tokens in flight, requests waiting)."""
        return {task: (r.budget.in_flight, r.budget.waiting) for task, r in self._runtimes.items()}

    def budget_stats(self) -> dict[str, tuple[int, int, int]]:
        """Per task: (the whole budget, this router's share of it, tokens of requests waiting)."""
        return {task: (r.budget.budget, r.budget.capacity, r.budget.waiting_tokens)
                for task, r in self._runtimes.items()}

    def matryoshka_dims(self, task: str) -> list[int]:
        return list(self.runtime(task).spec.matryoshka_dims)

    def projector_dim(self, task: str) -> int:
        return self.runtime(task).spec.projector_dim

    def runtime(self, task: str) -> TaskRuntime:
        try:
            return self._runtimes[task]
        except KeyError:
            raise InvalidRequestError(
                f"unknown task {task!r}; this service serves {self.tasks}", param="task") from None

    # -- execution ------------------------------------------------------------------
    async def embed(self, items: Sequence[Item], options: EmbedOptions) -> EmbedResult:
        """Embed ``items`` (one result per item, in order); the request is admitted whole."""
        runtime = self.runtime(options.task)
        plan = await self._planner.plan(runtime, items, options)
        limit = self.config.limits.max_request_tokens
        if plan.tokens > limit:
            raise PayloadTooLargeError(
                f"the request has about {plan.tokens} prompt tokens; the limit is {limit} tokens per request "
                "(limits.max_request_tokens): split it", param="input", code="too_many_tokens")
        async with runtime.budget.admit(plan.tokens) as grant:
            meter = CallMeter(grant)
            used = 0

            async def run(call: Call) -> None:
                nonlocal used
                async with meter.hold(call.tokens):
                    tokens = await self._send(runtime, call)
                used += tokens  # after the await: `used += await ...` would read `used` before it

            await all_or_first_error(run(call) for call in plan.calls)  # one failure cancels the rest
        rows = sum(output.rows for output in plan.outputs)
        if rows > INLINE_FINISH_ROWS or (options.output.multi and self.pool_factor(options) > 1):
            # token pooling is clustering: never on the event loop
            return await asyncio.to_thread(self._finish, runtime, plan, options, used)
        return self._finish(runtime, plan, options, used)

    async def _send(self, runtime: TaskRuntime, call: Call) -> int:
        """One /pooling call, its body folded into the plan's outputs as it streams in."""

        async def consume(response: aiohttp.ClientResponse) -> int:
            layouts, used = parse_metadata(response.headers.get("metadata"), len(call.sinks))
            sinks = {layout.index: call.sinks[layout.index](layout.rows) for layout in layouts}
            folder = BodyFolder(layouts, sinks)
            remaining = max((layout.end for layout in layouts), default=0)
            inline = remaining <= INLINE_BODY_BYTES
            try:
                while remaining:  # one await per slab, not per network chunk
                    slab = await response.content.readexactly(min(SLAB_BYTES, remaining))
                    remaining -= len(slab)
                    if inline:
                        folder.take(slab)
                    else:
                        await asyncio.to_thread(folder.take, slab)
                if await response.content.read(1):
                    raise BackendError("the backend's body is longer than its metadata says")
                folder.finish()
            except BaseException as exc:
                _withdraw(sinks)  # a dropped connection is retried: leave no trace of this attempt
                if isinstance(exc, asyncio.IncompleteReadError):
                    raise BackendError("the backend's body ended before the rows its metadata announces") from None
                raise
            return used

        try:
            return await runtime.pool.call(POOLING_PATH, {**call.body, **runtime.request_fields}, call.tokens,
                                           consume)
        except BackendRejection as rejection:
            raise self._rejection_error(rejection, call) from None
        except BackendError as failure:  # name the inputs; the router keeps the text for its log
            if failure.param is None:
                where = ", ".join(f"input[{i}]" for i in call.inputs[:8])
                failure.message = f"{where}: {failure.message}"
                failure.param = f"input[{call.inputs[0]}]"
                failure.args = (failure.message,)
            raise

    @staticmethod
    def _rejection_error(rejection: BackendRejection, call: Call) -> Exception:
        where = call.inputs[:8]
        if rejection.status in (400, 413, 422):  # about the input; 401/404 mean a misconfigured deployment
            kind = "the image" if call.is_image else "the input"
            return InvalidRequestError.about(where, f"the model rejected {kind}: {rejection.message}")
        return BackendError.about(where, f"the backend answered {rejection.status}: {rejection.message}")

    def pool_factor(self, options: EmbedOptions) -> int:
        """The token pooling factor of ``options``' multi-vectors: theirs, else the config's default."""
        if options.pool_factor is not None:
            return options.pool_factor
        return self.config.defaults.multivector_pool_factor

    def _finish(self, runtime: TaskRuntime, plan: Plan, options: EmbedOptions, used: int) -> EmbedResult:
        """The plan's folds -> one array per input, in input order."""
        singles: list[np.ndarray | None] = [None] * plan.inputs
        multis: list[np.ndarray | None] = [None] * plan.inputs
        dims = runtime.spec.matryoshka_dims
        factor = self.pool_factor(options)
        for output in plan.outputs:
            fold = output.fold
            if fold is None:
                raise BackendError("the backend did not answer for every input")
            if output.single:
                for index, vector in zip(output.inputs, fold.single_vectors(options.dimensions, dims)):
                    singles[index] = _finite(vector, index)
            if output.multi:
                for index, matrix in zip(output.inputs, fold.multi_vectors()):
                    multis[index] = pool_rows(_finite(matrix, index), factor)
        if options.output is OutputKind.BOTH:
            return EmbedResult(embeddings=singles, multivectors=multis, prompt_tokens=used)  # type: ignore[arg-type]
        chosen = multis if options.output is OutputKind.MULTI else singles
        return EmbedResult(embeddings=chosen, prompt_tokens=used)  # type: ignore[arg-type]

    def pool(self, task: str, rows: np.ndarray, *, is_image: bool, options: EmbedOptions) -> np.ndarray:
        """One input's hidden states -> its embedding, as :meth:`embed` pools them (for rows fetched elsewhere)."""
        runtime = self.runtime(task)
        output = Output(inputs=[0], single=options.output.single, multi=options.output.multi)
        fold = self._planner.fold_for(runtime, output, rows.shape[0], is_image)
        WindowSink(fold).feed(0, np.asarray(rows))
        plan = Plan(calls=[], outputs=[output], inputs=1, tokens=rows.shape[0])
        return self._finish(runtime, plan, options, rows.shape[0]).embeddings[0]


def _withdraw(sinks: dict[int, RowSink]) -> None:
    for sink in sinks.values():
        sink.withdraw()


def _finite(values: np.ndarray, index: int) -> np.ndarray:
    """A vector pooled from inf or NaN hidden states is garbage: refuse it rather than serve it."""
    if not np.isfinite(values).all():
        raise BackendError.about(index, "the backend's hidden states hold inf or NaN (an fp16 overflow "
                                 "in the model? serve it in bfloat16 or float32)")
    return values
