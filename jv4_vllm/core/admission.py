"""Admission in tokens, per request, the way TEI bounds work by ``max_batch_tokens``.

Each task has a budget of prompt tokens in flight: ``tokens_per_replica`` times its healthy
replicas. A request asks for all its tokens at once and is admitted whole, in arrival order;
a request bigger than the whole budget is admitted alone once nothing else is in flight, so
every request inside the limits runs eventually. Waiting is counted in requests (429 past
``max_queue``), never in calls. Inside an admitted request, a :class:`CallMeter` keeps the
request's own calls within its grant, so vLLM only ever holds what the budget allows and a
call's timeout measures vLLM's work, not a queue.

Routers of one fleet share the budget: each admits against its share (the budget divided by
the live routers it counts, :func:`~jv4_vllm.core.fleet.fleet_share`), so their parts add up
to the budget; a request bigger than a share still runs, alone in its router.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from jv4_vllm.core.fleet import fleet_share
from jv4_vllm.errors import OverloadedError

__all__ = ["CallMeter", "TokenBudget"]


@dataclass(eq=False, slots=True)
class _Waiter:
    cost: int
    grant: int = 0
    ready: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class TokenBudget:
    """FIFO admission of whole requests against a token budget that follows healthy replicas,
    and this router's share of it (``routers``: the live routers sharing it, itself included)."""

    def __init__(self, task: str, tokens_per_replica: int, max_queue: int, replicas: Callable[[], int],
                 routers: Callable[[], int] = lambda: 1) -> None:
        self.task = task
        self.tokens_per_replica = tokens_per_replica
        self.max_queue = max_queue
        self._replicas = replicas
        self._routers = routers
        self.in_flight = 0
        self._waiters: deque[_Waiter] = deque()

    @property
    def budget(self) -> int:
        """The task's whole budget, shared by every router of the fleet."""
        return self.tokens_per_replica * max(1, self._replicas())

    @property
    def capacity(self) -> int:
        """What this router may admit: its share of the budget."""
        return fleet_share(self.budget, self._routers())

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def waiting_tokens(self) -> int:
        """Prompt tokens of the requests waiting (the demand admission holds back)."""
        return sum(waiter.cost for waiter in self._waiters)

    def _fits(self, cost: int) -> bool:
        return self.in_flight == 0 or self.in_flight + min(cost, self.capacity) <= self.capacity

    @asynccontextmanager
    async def admit(self, cost: int) -> AsyncIterator[int]:
        """Hold ``min(cost, capacity)`` tokens of the budget (the grant) while the block runs."""
        if not self._waiters and self._fits(cost):
            grant = self._take(cost)
        else:
            if len(self._waiters) >= self.max_queue:
                raise OverloadedError(f"task {self.task!r} has {len(self._waiters)} requests waiting; "
                                      "retry shortly", retry_after=1.0)
            waiter = _Waiter(cost)
            self._waiters.append(waiter)
            try:
                await waiter.ready
            except BaseException:
                if waiter.grant:
                    self._give_back(waiter.grant)  # admitted just as it was cancelled
                else:
                    self._waiters.remove(waiter)
                    self.wake()
                raise
            grant = waiter.grant
        try:
            yield grant
        finally:
            self._give_back(grant)

    def _take(self, cost: int) -> int:
        grant = min(cost, self.capacity)
        self.in_flight += grant
        return grant

    def _give_back(self, grant: int) -> None:
        self.in_flight -= grant
        self.wake()

    def wake(self) -> None:
        """Admit, in order, every waiter at the head that now fits (also after capacity grows)."""
        while self._waiters and self._fits(self._waiters[0].cost):
            waiter = self._waiters.popleft()
            waiter.grant = self._take(waiter.cost)
            waiter.ready.set_result(None)


class CallMeter:
    """Keeps one request's calls in flight within its grant (a call bigger than the grant runs alone)."""

    def __init__(self, grant: int) -> None:
        self.grant = max(1, grant)
        self._used = 0
        self._changed = asyncio.Condition()

    @asynccontextmanager
    async def hold(self, tokens: int) -> AsyncIterator[None]:
        need = min(max(1, tokens), self.grant)
        async with self._changed:
            await self._changed.wait_for(lambda: self._used + need <= self.grant)
            self._used += need
        try:
            yield
        finally:
            async with self._changed:
                self._used -= need
                self._changed.notify_all()
