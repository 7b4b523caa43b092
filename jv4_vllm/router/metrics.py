"""Prometheus metrics of one router app (its own registry, so several apps can coexist).

Per request: count, errors and latency by route, task and status. Per embeddings call:
inputs by kind and prompt tokens. Per replica, read from the engine at scrape time:
health and calls in flight; per task, its budget, this router's share of it and the demand
waiting (the autoscaler's signal); the live routers of the fleet.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jv4_vllm.core.types import ImageInput, Item

__all__ = ["MetricsMiddleware", "RouterMetrics"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _BackendCollector(Collector):
    """Replica health and in-flight calls, read from the engine when Prometheus scrapes."""

    def __init__(self, engine: Callable[[], Any], routers: Callable[[], int]) -> None:
        self._engine = engine
        self._routers = routers

    def collect(self) -> Iterable[Metric]:
        healthy = GaugeMetricFamily("jv4_backend_healthy", "1 if the replica passes health checks",
                                    labels=["task", "replica"])
        in_flight = GaugeMetricFamily("jv4_backend_in_flight", "Calls in flight to the replica",
                                      labels=["task", "replica"])
        ready = GaugeMetricFamily("jv4_task_ready", "1 if the task has a healthy replica", labels=["task"])
        tokens = GaugeMetricFamily("jv4_admitted_tokens", "Prompt tokens of admitted requests in flight",
                                   labels=["task"])
        waiting = GaugeMetricFamily("jv4_waiting_requests", "Requests waiting for admission", labels=["task"])
        waiting_tokens = GaugeMetricFamily("jv4_waiting_tokens", "Prompt tokens of requests waiting for admission",
                                           labels=["task"])
        budget = GaugeMetricFamily("jv4_budget_tokens", "The task's token budget, shared by the whole fleet",
                                   labels=["task"])
        share = GaugeMetricFamily("jv4_share_tokens", "This router's share of the task's budget", labels=["task"])
        routers = GaugeMetricFamily("jv4_fleet_routers", "Live routers sharing the budgets, this one included",
                                    value=float(self._routers()))
        engine = self._engine()
        if engine is not None:
            for stats in engine.replica_stats():
                healthy.add_metric([stats.task, stats.url], 1.0 if stats.healthy else 0.0)
                in_flight.add_metric([stats.task, stats.url], float(stats.in_flight))
            for task, ok in engine.readiness().items():
                ready.add_metric([task], 1.0 if ok else 0.0)
            for task, (admitted, queued) in engine.admission_stats().items():
                tokens.add_metric([task], float(admitted))
                waiting.add_metric([task], float(queued))
            for task, (whole, part, demand) in engine.budget_stats().items():
                budget.add_metric([task], float(whole))
                share.add_metric([task], float(part))
                waiting_tokens.add_metric([task], float(demand))
        return [healthy, in_flight, ready, tokens, waiting, waiting_tokens, budget, share, routers]


class RouterMetrics:
    """The metric families of one app; ``engine`` returns the engine once it has started."""

    def __init__(self, engine: Callable[[], Any], routers: Callable[[], int] = lambda: 1) -> None:
        self.registry = CollectorRegistry()
        labels = ["route", "task", "status"]
        self.requests = Counter("jv4_requests", "HTTP requests", labels, registry=self.registry)
        self.errors = Counter("jv4_errors", "HTTP error responses", labels + ["type"], registry=self.registry)
        self.latency = Histogram("jv4_request_duration_seconds", "Time from request to response", ["route", "task"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inputs = Counter("jv4_inputs", "Inputs embedded", ["task", "kind"], registry=self.registry)
        self.tokens = Counter("jv4_prompt_tokens", "Prompt tokens embedded", ["task"], registry=self.registry)
        self.registry.register(_BackendCollector(engine, routers))

    def observe_embed(self, task: str, items: Sequence[Item], prompt_tokens: int) -> None:
        images = sum(isinstance(item, ImageInput) for item in items)
        if images:
            self.inputs.labels(task, "image").inc(images)
        if len(items) > images:
            self.inputs.labels(task, "text").inc(len(items) - images)
        self.tokens.labels(task).inc(prompt_tokens)

    def observe_request(self, route: str, task: str, status: int, seconds: float, error_type: str | None) -> None:
        self.requests.labels(route, task, str(status)).inc()
        self.latency.labels(route, task).observe(seconds)
        if status >= 400:
            self.errors.labels(route, task, str(status), error_type or "http_error").inc()

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Times every HTTP request and counts it by route template (unknown paths: "other")."""

    def __init__(self, app: ASGIApp, metrics: RouterMetrics, routes: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        state = scope.setdefault("state", {})
        status = 500  # what the client sees if the app raises before answering

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope["path"] if scope["path"] in self.routes else "other"
            self.metrics.observe_request(route, state.get("task", ""), status, time.perf_counter() - start,
                                         state.get("error_type"))
