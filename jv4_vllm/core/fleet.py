"""Many routers, one budget: each router admits its share of a task's budget, by live peer count.

A task's budget (``tokens_in_flight_per_replica`` times its healthy replicas) is what vLLM
may hold at once, whichever router sent it. Routers listed in ``router.peers`` (base URLs,
or one ``dns+http://name:port`` naming a headless Service of them) split it evenly: a
router's share is the budget divided by the routers it sees alive, itself included. The
peer set is kept fresh by the replica pool's own DNS discovery and health checks
(:class:`~jv4_vllm.core.replicas.ReplicaPool`), pointed at each peer's ``/peer`` route: a
router that dies stops answering and its share goes back to the others at their next check.
A router finds itself in the list by its random id (``/peer?id=<own id>`` answers 409 to
itself), so it always counts itself once, even before it serves.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from jv4_vllm.config import BackendSettings
from jv4_vllm.core.replicas import ReplicaPool

__all__ = ["PEER_PATH", "Fleet", "fleet_share"]

PEER_PATH = "/peer"
PEER_PROBE_TIMEOUT_S = 2.0  # a live router answers /peer from memory; a dead one must not hold its share long


def fleet_share(budget: int, routers: int) -> int:
    """One router's part of ``budget`` shared by ``routers`` live routers (itself included).

    Rounded down, so the parts never add up to more than the budget; at least one token, so a
    router always admits something (a request bigger than its share runs alone).
    """
    return max(1, budget // max(1, routers))


class Fleet:
    """The live routers of a fleet as this router sees them; alone when ``peers`` is empty."""

    def __init__(self, peers: list[str], settings: BackendSettings, router_id: str | None = None) -> None:
        self.id = router_id or uuid.uuid4().hex
        self._listeners: list[Callable[[], None]] = []
        self._pool: ReplicaPool | None = None
        if peers:
            # Peers are checked as often as replicas, their names re-resolved as often too: a joining
            # router is counted by the others within about one interval.
            timeout = min(settings.connect_timeout_s, PEER_PROBE_TIMEOUT_S)
            checks = settings.model_copy(update={"connect_timeout_s": timeout,
                                                 "dns_refresh_s": settings.health_interval_s})
            self._pool = ReplicaPool("peers", peers, checks, on_change=self._changed,
                                     health_path=f"{PEER_PATH}?id={self.id}")

    def size(self) -> int:
        """Live routers: the peers answering their health check, plus this one."""
        return 1 + (self._pool.healthy_count() if self._pool is not None else 0)

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever the peer set may have changed (budgets re-admit their waiters)."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    async def start(self) -> None:
        """Find the peers once (so the first requests already see them), then keep the set fresh."""
        if self._pool is not None:
            await self._pool.start()

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
