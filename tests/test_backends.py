"""ReplicaPool behaviour against small loopback servers: retry elsewhere, least outstanding, timeouts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from aiohttp import web

from jv4_vllm.core.replicas import ReplicaPool
from jv4_vllm.config import BackendSettings
from jv4_vllm.errors import BackendError, BackendTimeoutError
from vllm_stack import free_port


class Replica:
    """A loopback HTTP server whose /pooling answer the test sets; counts the calls it gets."""

    def __init__(self, status: int = 200, delay: float = 0.0) -> None:
        self.status, self.delay, self.calls = status, delay, 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    async def _pooling(self, request: web.Request) -> web.Response:
        self.calls += 1
        await asyncio.sleep(self.delay)
        return web.Response(status=self.status, body=b"ok", headers={"metadata": "{}"})

    @staticmethod
    async def _health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def __aenter__(self) -> "Replica":
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_post("/pooling", self._pooling)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()


@asynccontextmanager
async def started_pool(*replicas: Replica, **overrides: object) -> AsyncIterator[ReplicaPool]:
    """A started pool over the given replicas (background health checks effectively off)."""
    pool = ReplicaPool("code", [r.url for r in replicas], BackendSettings(health_interval_s=60, **overrides))
    await pool.start()
    try:
        yield pool
    finally:
        await pool.aclose()


async def test_a_5xx_is_retried_once_on_the_other_replica():
    async with Replica(status=500) as bad, Replica() as good, started_pool(bad, good) as pool:
        # One request already on the good replica: least-outstanding choice tries the failing one first.
        busy = next(r for r in pool.replicas if r.url == good.url)
        busy.in_flight += 1
        response = await pool.post("/pooling", {"input": [[1, 2]]})
        assert response.status == 200 and response.content == b"ok"
        assert (bad.calls, good.calls) == (1, 1)  # exactly one retry, on the other replica


async def test_both_replicas_failing_is_a_backend_error():
    async with Replica(status=503) as one, Replica(status=500) as two, started_pool(one, two) as pool:
        with pytest.raises(BackendError, match="backend failed"):
            await pool.post("/pooling", {})
        assert one.calls == 1 and two.calls == 1


async def test_calls_spread_by_least_outstanding_requests():
    async with Replica(delay=0.2) as a, Replica(delay=0.2) as b, started_pool(a, b) as pool:
        await asyncio.gather(*(pool.post("/pooling", {}) for _ in range(10)))
        assert a.calls == 5 and b.calls == 5


async def test_a_slow_replica_times_out_with_a_504():
    async with Replica(delay=3.0) as slow, started_pool(slow, request_timeout_s=0.5) as pool:
        with pytest.raises(BackendTimeoutError):
            await pool.post("/pooling", {})
