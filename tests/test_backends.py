"""ReplicaPool behaviour against small loopback servers: retry elsewhere, least outstanding, timeouts.

These servers stand in for faults real vLLM cannot be made to produce on demand (a 5xx, a
stall); the numbers the engine pools are tested on real vLLM elsewhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from aiohttp import ClientResponse, web
from fault_upstream import FaultUpstream

from jv4_vllm.config import BackendSettings
from jv4_vllm.core.replicas import INPUT_FAILED, ReplicaPool
from jv4_vllm.errors import BackendError, BackendTimeoutError, BackendUnavailableError


class Replica(FaultUpstream):
    """A stand-in replica whose /pooling answer the test sets (status, delay)."""

    def __init__(self, status: int = 200, delay: float = 0.0) -> None:
        super().__init__()
        self.status, self.delay = status, delay

    async def pooling(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.delay)
        if self.status >= 400:
            return web.json_response({"error": {"message": f"engine fault {self.port}"}}, status=self.status)
        return web.Response(status=self.status, body=b"ok", headers={"metadata": "{}"})


@asynccontextmanager
async def started_pool(*replicas: Replica, **overrides: object) -> AsyncIterator[ReplicaPool]:
    """A started pool over the given replicas (background health checks effectively off)."""
    pool = ReplicaPool("code", [r.url for r in replicas], BackendSettings(health_interval_s=60, **overrides))
    await pool.start()
    try:
        yield pool
    finally:
        await pool.aclose()


async def read_body(response: ClientResponse) -> bytes:
    return await response.read()


async def test_a_5xx_is_retried_once_on_the_other_replica():
    async with Replica(status=500) as bad, Replica() as good, started_pool(bad, good) as pool:
        # Work already on the good replica: least-outstanding choice tries the failing one first.
        busy = next(r for r in pool.replicas if r.url == good.url)
        busy.tokens_in_flight += 1
        assert await pool.call("/pooling", {"input": [[1, 2]]}, 2, read_body) == b"ok"
        assert (bad.calls, good.calls) == (1, 1)  # exactly one retry, on the other replica


async def test_both_replicas_failing_one_payload_is_the_requests_fault():
    async with Replica(status=503) as one, Replica(status=500) as two, started_pool(one, two) as pool:
        with pytest.raises(BackendError, match="every replica tried failed") as caught:
            await pool.call("/pooling", {}, 1, read_body)
        assert one.calls == 1 and two.calls == 1
        assert caught.value.status == 502 and caught.value.code == INPUT_FAILED
        assert "engine fault" in caught.value.message  # vLLM's own message reaches the error (and the log)
        assert pool.healthy() and all(r.failures == 0 for r in pool.replicas)  # nobody is penalised


async def test_a_poison_payload_resent_in_a_loop_never_ejects_a_replica():
    async with Replica(status=500) as one, Replica(status=500) as two, started_pool(one, two) as pool:
        for _ in range(10):
            with pytest.raises(BackendError):
                await pool.call("/pooling", {"input": "poison"}, 1, read_body)
        assert pool.healthy_count() == 2 and all(r.failures == 0 for r in pool.replicas)
        assert one.calls + two.calls == 11  # known poison is not retried on a second replica again


async def test_the_same_payload_failing_on_the_only_replica_counts_once():
    async with Replica(status=500) as only, started_pool(only) as pool:
        for _ in range(5):
            with pytest.raises(BackendError):
                await pool.call("/pooling", {"input": "poison"}, 1, read_body)
        assert pool.healthy() and pool.replicas[0].failures == 1


async def test_calls_spread_by_least_outstanding_tokens():
    async with Replica(delay=0.2) as a, Replica(delay=0.2) as b, started_pool(a, b) as pool:
        await asyncio.gather(*(pool.call("/pooling", {}, 10, read_body) for _ in range(10)))
        assert a.calls == 5 and b.calls == 5


async def test_a_timeout_is_a_504_and_is_not_retried():
    async with Replica(delay=3.0) as slow, Replica(delay=3.0) as other, \
            started_pool(slow, other, request_timeout_s=0.5) as pool:
        with pytest.raises(BackendTimeoutError) as caught:
            await pool.call("/pooling", {}, 1, read_body)
        assert caught.value.status == 504
        assert slow.calls + other.calls == 1  # the slowest calls are not sent twice


async def test_a_replica_that_just_failed_comes_last():
    async with Replica(status=500) as bad, Replica() as good, started_pool(bad, good) as pool:
        next(r for r in pool.replicas if r.url == good.url).tokens_in_flight += 1  # bad is tried first
        for _ in range(3):
            assert await pool.call("/pooling", {}, 1, read_body) == b"ok"
        assert (bad.calls, good.calls) == (1, 3)  # after its failure it is not tried again while good serves


async def test_a_replica_failing_three_different_requests_in_a_row_is_out_until_its_health_check():
    async with Replica(status=500) as only, started_pool(only) as pool:
        for n in range(3):
            with pytest.raises(BackendError):
                await pool.call("/pooling", {"input": f"request {n}"}, 1, read_body)
        assert only.calls == 3 and not pool.healthy()
        with pytest.raises(BackendUnavailableError):  # out of rotation: nothing is sent
            await pool.call("/pooling", {}, 1, read_body)
        assert only.calls == 3
        await pool.check_health()  # its /health still answers: back in, failures forgotten
        assert pool.healthy() and all(r.failures == 0 for r in pool.replicas)


class DropsFirstConnection(Replica):
    """Closes the connection without an answer on its first call (a kept-alive connection the server
    dropped), then answers."""

    async def pooling(self, request: web.Request) -> web.Response:
        if self.calls == 1:
            request.transport.close()
            await asyncio.sleep(0.1)
        return await super().pooling(request)


async def test_a_dropped_connection_on_the_only_replica_is_retried_there():
    async with DropsFirstConnection() as only, started_pool(only) as pool:
        assert await pool.call("/pooling", {}, 1, read_body) == b"ok"
        assert only.calls == 2 and pool.healthy()
