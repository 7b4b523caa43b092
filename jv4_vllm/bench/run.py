"""One benchmark run: start the stack, check every path agrees, measure every cell, stop the stack."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from jv4_vllm.config import Config
from jv4_vllm.core.engine import Engine
from jv4_vllm.core.prompts import PromptBuilder
from jv4_vllm.core.spec import load_task_spec
from jv4_vllm.bench.ceiling import Recording, measure_ceiling, record_response
from jv4_vllm.bench.loadgen import CpuMeter, Measurement, closed_loop
from jv4_vllm.bench.paths import EnginePath, ReferencePath, RouterPath, VllmPath
from jv4_vllm.bench.settings import DIRECT_PATHS, BenchSettings
from jv4_vllm.bench.stack import Stack, bench_config
from jv4_vllm.bench.workloads import Workload, build_workload

__all__ = ["Cell", "RunResult", "run_bench"]

log = logging.getLogger(__name__)
RAW_MODE = "raw"  # direct vLLM cells: hidden states on the wire, no pooling


@dataclass
class Cell:
    path: str
    workload: str
    mode: str
    concurrency: int
    batch: int
    measurement: Measurement


@dataclass
class RunResult:
    cells: list[Cell] = field(default_factory=list)
    parity: list[dict[str, Any]] = field(default_factory=list)
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    tokens_per_item: dict[str, float] = field(default_factory=dict)
    ceiling: dict[str, Any] | None = None
    pooling: dict[str, Any] | None = None  # the token-pooling row (bench/pooling.py)
    seconds: float = 0.0
    load_average_1m_at_start: float = 0.0  # the machine may be shared: say how busy it was


def _requests(path: Any, workload: Workload, mode: str, batch: int, pool: int) -> list[Any]:
    """Requests built before the clock starts; request k carries items k*batch .. k*batch+batch-1 (cycled)."""
    return [path.request(workload, mode, [(k * batch + j) % pool for j in range(batch)]) for k in range(pool)]


def _min_cosine(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    worst = 1.0
    for x, y in zip(a, b, strict=True):
        x, y = np.atleast_2d(x).astype(np.float64), np.atleast_2d(y).astype(np.float64)
        if x.shape != y.shape:
            return float("nan")
        cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
        worst = min(worst, float(cos.min()))
    return worst


class _Runner:
    def __init__(self, settings: BenchSettings, stack: Stack) -> None:
        self.settings = settings
        self.stack = stack
        self.meter = CpuMeter()
        self.result = RunResult()
        self.paths: dict[str, Any] = {}
        self.reference: ReferencePath | None = None

    async def run(self, http: httpx.AsyncClient) -> RunResult:
        s = self.settings
        began = time.perf_counter()
        self.result.load_average_1m_at_start = os.getloadavg()[0]
        config = bench_config(s)
        spec = load_task_spec(config.task_dir(s.task))
        prompts = PromptBuilder(spec)
        workloads = {name: build_workload(name, prompts, count=s.pool_size, query_tokens=s.query_tokens,
                                          passage_tokens=s.passage_tokens, image_size=s.image_size, seed=s.seed)
                     for name in s.workloads}
        if "reference" in s.paths:
            log.info("loading the reference encoder")
            self.reference = ReferencePath(str(s.source), s.task, s.reference_batch)
        vllm_url = self._start_vllm(config)
        served = config.served_name(s.task)
        # The engine runs its own path, and pools the direct paths' hidden states for the equality check.
        engine = await Engine.start(config) if {"engine", *DIRECT_PATHS} & set(s.paths) else None
        recordings: dict[str, Recording] = {}
        try:
            for name, encoding in zip(DIRECT_PATHS, ("float", "bytes"), strict=True):
                if name in s.paths:
                    self.paths[name] = VllmPath(name, vllm_url, served, prompts, http, encoding, engine, s.task)
            if engine is not None and "engine" in s.paths:
                self.paths["engine"] = EnginePath(engine, s.task)
            if "router" in s.paths:
                router, router_url = self.stack.start_router(config, "bench-router")
                self.meter.watch("router", router.process.pid)
                self.paths["router"] = RouterPath(router_url, config.model_name, s.task, http)
            for workload in workloads.values():
                await self._probe(workload)
            if "router" in s.paths:  # token pooling against colpali-engine, on rows this router serves
                from jv4_vllm.bench.long_inputs import long_passage
                from jv4_vllm.bench.pooling import pooling_row

                text = long_passage(prompts.tokenizer, 990)
                self.result.pooling = await asyncio.to_thread(pooling_row, router_url, text,
                                                              task=f"{s.task}.passage")
            if s.ceiling_s > 0:  # real answers for the replay upstreams
                recorder = VllmPath("recorder", vllm_url, served, prompts, http, "bytes")
                for name in ("query", "passage"):
                    if name in workloads:
                        body = recorder.request(workloads[name], "single", [0])[0]
                        recordings[name] = await record_response(http, vllm_url, body, s.out / "logs", name)
            for workload in workloads.values():
                await self._measure_workload(workload)
        finally:
            if engine is not None:
                await engine.aclose()
        self.stack.close()  # frees the cores and memory before the ceiling runs
        if recordings:
            self.result.ceiling = await measure_ceiling(s, self.stack, http, workloads, recordings, spec, prompts)
        self.result.seconds = time.perf_counter() - began
        return self.result

    def _start_vllm(self, config: Config) -> str:
        """The deployment's URL: the one given, or one started here (its CPU time is then watched)."""
        if self.settings.vllm_url is not None:
            return self.settings.vllm_url
        log.info("starting vLLM (%s)", self.settings.task)
        child, url = self.stack.start_vllm(config, self.settings.task)
        self.meter.watch("vllm", child.process.pid)
        return url

    # -- equality of the paths ----------------------------------------------------------------
    async def _probe(self, workload: Workload) -> None:
        """Every path encodes the same probe items; every pair of paths is compared."""
        s = self.settings
        indices = list(range(min(s.probe_items, s.pool_size)))
        raw: dict[str, Any] = {}
        for name, path in self.paths.items():
            if not path.per_mode:
                raw[name] = await path.send(path.request(workload, "single", indices))
        for mode in s.modes:
            vectors: dict[str, list[np.ndarray]] = {}
            for name, path in self.paths.items():
                outcome = raw[name] if name in raw else await path.send(path.request(workload, mode, indices))
                vectors[name] = path.vectors(outcome, workload, mode)
                if outcome.tokens and workload.name not in self.result.tokens_per_item:
                    self.result.tokens_per_item[workload.name] = outcome.tokens / outcome.items
            if self.reference is not None:
                vectors["reference"] = self.reference.encode(workload, mode, indices)
            for name, arrays in vectors.items():
                for i, array in enumerate(arrays):
                    self.result.vectors[f"{workload.name}/{mode}/{name}/{i}"] = np.asarray(array, np.float32)
            for a, b in itertools.combinations(vectors, 2):
                self.result.parity.append({"workload": workload.name, "mode": mode, "a": a, "b": b,
                                           "min_cosine": _min_cosine(vectors[a], vectors[b])})

    # -- timing ----------------------------------------------------------------------------------
    async def _measure_workload(self, workload: Workload) -> None:
        s = self.settings
        if self.reference is not None:
            for mode in s.modes:
                self._add(Cell("reference", workload.name, mode, 1, s.reference_batch,
                               self._reference_cell(workload, mode)))
        plans = [(name, RAW_MODE) for name, p in self.paths.items() if not p.per_mode]
        plans += [(name, mode) for mode in s.modes for name, p in self.paths.items() if p.per_mode]
        requests = {plan: _requests(self.paths[plan[0]], workload, plan[1], s.batch, s.pool_size) for plan in plans}
        for plan in plans:  # warm-up: first requests of each kind are not timed
            for request in requests[plan][: s.warmup_requests]:
                await self.paths[plan[0]].send(request)
        for concurrency in s.concurrency:  # paths interleaved: side by side in time
            for name, mode in plans:
                log.info("%s %s %s c=%d", workload.name, mode, name, concurrency)
                measurement = await closed_loop(self.paths[name].send, requests[(name, mode)], concurrency,
                                                s.duration_s, self.meter)
                self._add(Cell(name, workload.name, mode, concurrency, s.batch, measurement))

    def _reference_cell(self, workload: Workload, mode: str) -> Measurement:
        s = self.settings
        assert self.reference is not None
        size = s.reference_batch
        batches = [[(k * size + j) % s.pool_size for j in range(size)] for k in range(s.pool_size)]
        self.reference.encode(workload, mode, batches[0])  # warm-up
        result = Measurement()
        per_item = self.result.tokens_per_item.get(workload.name, 0.0)
        cpu_before = self.meter.read()
        start = time.perf_counter()
        for k in itertools.count():
            indices = batches[k % len(batches)]
            began = time.perf_counter()
            self.reference.encode(workload, mode, indices)
            tokens = (sum(len(workload.token_ids[i]) for i in indices) if workload.token_ids
                      else round(per_item * len(indices)))
            result.requests += 1
            result.items += len(indices)
            result.tokens += tokens
            result.latencies_s.append(time.perf_counter() - began)
            if time.perf_counter() - start >= s.duration_s:
                break
        result.seconds = time.perf_counter() - start
        result.cpu_s = self.meter.delta(cpu_before, self.meter.read())
        return result

    def _add(self, cell: Cell) -> None:
        m = cell.measurement
        log.info("  %-10s %-7s %-6s c=%-3d %7.1f items/s  errors=%d", cell.path, cell.workload, cell.mode,
                 cell.concurrency, m.items / m.seconds if m.seconds else 0.0, m.errors)
        self.result.cells.append(cell)


async def run_bench(settings: BenchSettings) -> RunResult:
    """Everything in one go; every process started here is stopped before returning."""
    stack = Stack(settings.out / "logs")
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=4 * settings.max_concurrency)
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0), limits=limits) as http:
            return await _Runner(settings, stack).run(http)
    finally:
        stack.close()
