"""ByteBudget: FIFO grants of bytes, cancellation, and the extra bytes a request makes."""

from __future__ import annotations

import asyncio

import pytest

from jv4_vllm.router.byte_budget import HOLD_BYTES, ByteBudget, hold_more


async def test_grants_are_fifo_and_wait_until_they_fit():
    budget = ByteBudget(10)
    await budget.acquire(6)
    order: list[str] = []

    async def take(name: str, size: int) -> None:
        await budget.acquire(size)
        order.append(name)

    big = asyncio.create_task(take("big", 8))
    await asyncio.sleep(0)
    small = asyncio.create_task(take("small", 2))  # would fit now, but waits behind the big one
    await asyncio.sleep(0.01)
    assert order == [] and budget.waiting == 2
    budget.release(6)
    await asyncio.gather(big, small)
    assert order == ["big", "small"] and budget.held == 10


async def test_a_cancelled_waiter_leaves_no_trace():
    budget = ByteBudget(4)
    await budget.acquire(4)
    waiter = asyncio.create_task(budget.acquire(3))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    budget.release(4)
    assert budget.held == 0 and budget.waiting == 0


async def test_extra_bytes_are_counted_without_waiting_and_hold_back_new_bodies():
    budget = ByteBudget(10)
    await budget.acquire(5)
    held = [5]

    def hold(size: int) -> None:
        budget.take(size)
        held[0] += size

    token = HOLD_BYTES.set(hold)
    try:
        hold_more(20)  # a converted image: over the bound, but never stalls its request
    finally:
        HOLD_BYTES.reset(token)
    hold_more(100)  # outside a request: nothing to count
    assert budget.held == 25 and held == [25]
    newcomer = asyncio.create_task(budget.acquire(1))
    await asyncio.sleep(0.01)
    assert not newcomer.done()
    budget.release(held[0])
    await newcomer
    assert budget.held == 1
