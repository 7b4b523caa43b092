"""The share arithmetic of a fleet of routers, and peers finding each other through their /peer route.

No vLLM here: budgets are driven directly, and the peer checks run between small apps that
serve the router's own /peer route on loopback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from fastapi import FastAPI
from vllm_stack import InProcessServer, free_port

from jv4_vllm.config import BackendSettings
from jv4_vllm.core.admission import TokenBudget
from jv4_vllm.core.fleet import Fleet, fleet_share
from jv4_vllm.router.app import routes

pytestmark = pytest.mark.timeout(60)

INTERVAL_S = 0.2


@pytest.mark.parametrize(("budget", "routers", "share"), [
    (12288, 1, 12288),  # alone: the whole budget
    (12288, 3, 4096),
    (12288, 2, 6144),
    (10, 3, 3),  # rounded down: 3 x 3 <= 10
    (2, 3, 1),  # never zero: a router always admits something
    (100, 0, 100),  # no count yet means alone
])
def test_share_is_the_budget_split_by_live_routers(budget: int, routers: int, share: int) -> None:
    assert fleet_share(budget, routers) == share
    if routers and budget >= routers:
        assert routers * fleet_share(budget, routers) <= budget


async def _settle() -> None:
    await asyncio.sleep(0.01)


class Requests:
    """Requests held inside a budget until released, by name."""

    def __init__(self, budget: TokenBudget) -> None:
        self.budget = budget
        self.admitted: dict[str, int] = {}  # name -> grant
        self._release: dict[str, asyncio.Event] = {}
        self.tasks: list[asyncio.Task[None]] = []

    def send(self, name: str, cost: int) -> None:
        self._release[name] = asyncio.Event()

        async def request() -> None:
            async with self.budget.admit(cost) as grant:
                self.admitted[name] = grant
                await self._release[name].wait()

        self.tasks.append(asyncio.create_task(request()))

    def release(self, name: str) -> None:
        self._release[name].set()

    async def finish(self) -> None:
        for event in self._release.values():
            event.set()
        await asyncio.gather(*self.tasks)


async def test_peers_joining_shrink_the_share_and_leaving_hands_it_back() -> None:
    routers = 1
    budget = TokenBudget("t", tokens_per_replica=300, max_queue=10, replicas=lambda: 1, routers=lambda: routers)
    held = Requests(budget)
    held.send("a", 100)
    held.send("b", 100)
    held.send("c", 100)
    await _settle()
    assert sorted(held.admitted) == ["a", "b", "c"] and budget.capacity == 300  # alone: the whole budget
    routers = 3  # two peers joined: the share is 100; what is admitted stays, nothing new gets in
    held.send("d", 100)
    await _settle()
    assert "d" not in held.admitted and budget.capacity == 100 and budget.waiting_tokens == 100
    held.release("a")
    held.release("b")
    await _settle()
    assert "d" not in held.admitted  # c alone still fills the share
    held.release("c")
    await _settle()
    assert held.admitted["d"] == 100
    held.send("e", 100)
    await _settle()
    assert "e" not in held.admitted
    routers = 2  # a peer left: 150 each; the waiter is admitted as soon as the budget is told
    budget.wake()
    await _settle()
    assert "e" not in held.admitted  # 100 + 100 > 150
    routers = 1
    budget.wake()
    await _settle()
    assert held.admitted["e"] == 100 and budget.in_flight == 200
    await held.finish()
    assert budget.in_flight == 0 and budget.waiting == 0


async def test_a_request_bigger_than_the_share_runs_alone_with_the_share_as_its_grant() -> None:
    budget = TokenBudget("t", tokens_per_replica=300, max_queue=10, replicas=lambda: 1, routers=lambda: 3)
    held = Requests(budget)
    held.send("small", 40)
    held.send("big", 250)  # bigger than the share (100), not than the budget
    await _settle()
    assert held.admitted == {"small": 40}  # waits for the router to be empty
    held.send("after", 10)  # FIFO: behind the big one, though it would fit
    await _settle()
    assert "after" not in held.admitted
    held.release("small")
    await _settle()
    # Its calls are metered to the share: vLLM holds at most one share of it at a time.
    assert held.admitted["big"] == 100 and "after" not in held.admitted
    held.release("big")
    await _settle()
    assert held.admitted["after"] == 10
    await held.finish()


async def test_the_share_follows_healthy_replicas_too() -> None:
    replicas = 2
    budget = TokenBudget("t", tokens_per_replica=300, max_queue=10, replicas=lambda: replicas, routers=lambda: 3)
    assert (budget.budget, budget.capacity) == (600, 200)
    replicas = 0  # no healthy replica: one replica's budget, so requests still queue for the 503 path
    assert (budget.budget, budget.capacity) == (300, 100)


def _peer_app(fleet: Fleet) -> FastAPI:
    """The router's own /peer route over ``fleet``, without an engine."""
    app = FastAPI()
    app.state.fleet = fleet
    app.include_router(routes)
    return app


async def _until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.02)


async def test_routers_count_each_other_once_and_a_stopped_one_leaves() -> None:
    settings = BackendSettings(health_interval_s=INTERVAL_S, connect_timeout_s=1.0)
    ports = [free_port() for _ in range(3)]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    fleets = [Fleet(urls, settings) for _ in ports]
    servers = [InProcessServer(_peer_app(fleet), port) for fleet, port in zip(fleets, ports)]
    for server in servers:
        await server.__aenter__()
    try:
        for fleet in fleets:
            await fleet.start()
        # Each finds the other two answering, and itself answering 409: three, not four.
        assert [fleet.size() for fleet in fleets] == [3, 3, 3]
        changed: list[int] = []
        fleets[0].subscribe(lambda: changed.append(fleets[0].size()))
        await servers[2].__aexit__(None, None, None)  # one router goes away
        await _until(lambda: fleets[0].size() == 2 and fleets[1].size() == 2)
        assert 2 in changed  # budgets were told, so their waiters are admitted at once
    finally:
        for fleet in fleets:
            await fleet.aclose()
        for server in servers[:2]:
            await server.__aexit__(None, None, None)


async def test_a_router_alone_or_listing_only_itself_counts_one() -> None:
    assert Fleet([], BackendSettings()).size() == 1
    port = free_port()
    fleet = Fleet([f"http://127.0.0.1:{port}"], BackendSettings(health_interval_s=INTERVAL_S))
    async with InProcessServer(_peer_app(fleet), port):
        await fleet.start()
        assert fleet.size() == 1
        await fleet.aclose()
