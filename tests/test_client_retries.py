"""The client waits out 429/503 with Retry-After and failed connections, within its bounds.

A proxy (tests/fault_upstream.py) answers the first requests as an overloaded router would,
then forwards to the real router over the live deployments.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from fault_upstream import RouterProxy

from jv4_vllm import AsyncClient, BackendUnavailableError, OverloadedError, Retries

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300)]

TEXTS = ["a query about retries", "another one"]


async def _direct(router_url: str) -> np.ndarray:
    async with AsyncClient(router_url) as client:
        return await client.encode_text(TEXTS)


@pytest.mark.parametrize("status", [429, 503])
async def test_waits_out_retry_after_and_succeeds(router_url: str, status: int) -> None:
    want = await _direct(router_url)
    async with RouterProxy(router_url, fail=2, status=status, retry_after="0.3") as proxy, \
            AsyncClient(proxy.url, retries=Retries(attempts=4, max_wait_s=5)) as client:
        started = time.monotonic()
        got = await client.encode_text(TEXTS)
        waited = time.monotonic() - started
    assert len(proxy.bodies) == 3 and waited >= 0.6  # two answers of Retry-After: 0.3, honoured
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


async def test_gives_up_with_the_servers_error_after_its_attempts(router_url: str) -> None:
    async with RouterProxy(router_url, fail=100, status=429, retry_after="0.1") as proxy, \
            AsyncClient(proxy.url, retries=Retries(attempts=3)) as client:
        with pytest.raises(OverloadedError, match=r"busy \(3\)") as info:
            await client.encode_text(TEXTS)
    assert len(proxy.bodies) == 3 and info.value.retry_after == 0.1 and info.value.code == "overloaded"


async def test_gives_up_at_once_when_retry_after_is_past_the_wait_bound(router_url: str) -> None:
    async with RouterProxy(router_url, fail=100, status=503, retry_after="30") as proxy, \
            AsyncClient(proxy.url, retries=Retries(max_wait_s=5)) as client:
        with pytest.raises(BackendUnavailableError, match=r"busy \(1\)"):
            await client.encode_text(TEXTS)
    assert len(proxy.bodies) == 1


async def test_a_failed_connection_is_retried_with_backoff(router_url: str) -> None:
    want = await _direct(router_url)
    proxy = RouterProxy(router_url)  # its port is chosen, nothing listens on it yet
    async with AsyncClient(proxy.url, retries=Retries(attempts=8, backoff_s=0.2, max_backoff_s=0.5)) as client:
        job = asyncio.create_task(client.encode_text(TEXTS))
        await asyncio.sleep(0.5)
        async with proxy:
            got = await job
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert len(proxy.bodies) == 1


def test_retries_are_bounded_and_checked() -> None:
    with pytest.raises(ValueError):
        Retries(attempts=0)
    with pytest.raises(ValueError):
        Retries(max_wait_s=-1)
