"""How many requests a job keeps in flight, adapted to what the service says.

The limit starts in slow start, as TCP does: it doubles with every window of answers
while latency holds, so a job reaches the service's knee within a few dozen answers
rather than spending a short job's whole length ramping up; the first window whose latency
does not hold (or the first overload) ends slow start. After that the limit grows by a
quarter while latency holds (each window of answers is compared with the best
latency seen, per item, so mixed request sizes compare fairly), and also while the
throughput it implies (limit / latency per item, Little's law) still rises by more than
5%: a batching server can gain from more requests even as each one waits longer. It
shrinks when latency climbs and throughput does not, i.e. when requests only queue. A 429 or 503 halves it and pauses every sender
until ``Retry-After`` (or an exponential backoff); a connection failure backs off the
same way. Nothing here fails a line: the caller retries until the service answers.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

__all__ = ["Pacer", "PacingSettings"]


@dataclass(frozen=True)
class PacingSettings:
    initial: int = 4
    minimum: int = 1
    maximum: int = 64
    tolerance: float = 1.6  # window latency per item up to this x the best keeps growing
    backoff_s: float = 0.25  # first backoff without Retry-After; doubles per failure, with jitter
    max_backoff_s: float = 30.0


class Pacer:
    """A concurrency gate whose size follows latency and overload signals."""

    def __init__(self, settings: PacingSettings | None = None) -> None:
        self.settings = settings or PacingSettings()
        self.limit = float(self.settings.initial)
        self.in_flight = 0
        self._ahead_waiting = 0
        self.peak = self.settings.initial
        self._not_before = 0.0
        self._changed = asyncio.Condition()
        self._best: float | None = None
        self._window: list[float] = []
        self._last_cut = 0.0
        self._last_rate: float | None = None
        self._slow_start = True
        self.overloads = 0
        self.failures = 0

    async def acquire(self, *, ahead: bool = False) -> None:
        """Wait for a free slot (and for any pause to end); ``ahead`` waiters take free slots first."""
        async with self._changed:
            self._ahead_waiting += ahead
            try:
                while True:
                    wait = self._not_before - time.monotonic()
                    if wait > 0:
                        try:
                            await asyncio.wait_for(self._changed.wait(), wait)
                        except TimeoutError:
                            pass
                        continue
                    free = self.in_flight < max(int(self.limit), self.settings.minimum)
                    if free and (ahead or not self._ahead_waiting):
                        self.in_flight += 1
                        return
                    await self._changed.wait()
            finally:
                self._ahead_waiting -= ahead

    async def abandon(self) -> None:
        """Give the slot back without a measurement (the request was cancelled or given up)."""
        await self._release()

    async def _release(self) -> None:
        async with self._changed:
            self.in_flight -= 1
            self._changed.notify_all()

    async def done(self, seconds: float, items: int) -> None:
        """An answer came back in ``seconds`` for ``items`` inputs."""
        self._window.append(seconds / max(items, 1))
        if len(self._window) >= max(4, int(self.limit)):
            self._adapt(sum(self._window) / len(self._window))
            self._window.clear()
        await self._release()

    def _adapt(self, latency: float) -> None:
        s = self.settings
        if self._best is None or latency < self._best:
            self._best = latency
        else:
            self._best *= 1.02  # let an old best fade, so a slower service is not chased forever
        rate = int(self.limit) / latency if latency > 0 else float("inf")
        gaining = self._last_rate is not None and rate > self._last_rate * 1.05
        self._last_rate = rate
        holds = latency <= self._best * s.tolerance
        if self._slow_start and holds:
            self.limit = min(float(s.maximum), self.limit * 2)
            self.peak = max(self.peak, int(self.limit))
            return
        self._slow_start = False
        if holds or gaining:
            self.limit = min(float(s.maximum), self.limit + max(1.0, self.limit / 4))
        elif latency > self._best * s.tolerance * 1.5:
            self.limit = max(float(s.minimum), self.limit * 0.8)
        self.peak = max(self.peak, int(self.limit))

    async def overloaded(self, retry_after: float | None, attempt: int) -> None:
        """429/503: cut the limit (once per pause) and pause all senders."""
        self.overloads += 1
        await self._pause(retry_after, attempt, cut=True)

    async def unreachable(self, attempt: int) -> None:
        """No answer at all (connection refused, reset, timeout): back off."""
        self.failures += 1
        await self._pause(None, attempt, cut=True)

    async def server_error(self, attempt: int) -> None:
        """A 5xx that may pass: back off without pausing the others."""
        self.failures += 1
        await self._release()
        await asyncio.sleep(self._backoff(attempt))

    def _backoff(self, attempt: int) -> float:
        s = self.settings
        return min(s.max_backoff_s, s.backoff_s * 2 ** min(attempt, 16)) * random.uniform(0.5, 1.0)

    async def _pause(self, retry_after: float | None, attempt: int, *, cut: bool) -> None:
        now = time.monotonic()
        delay = retry_after if retry_after is not None else self._backoff(attempt)
        async with self._changed:
            self.in_flight -= 1
            self._slow_start = False
            if cut and now >= self._last_cut:
                self.limit = max(float(self.settings.minimum), self.limit / 2)
                self._window.clear()
                self._last_rate = None
                self._last_cut = now + delay  # one cut per pause, not one per answer of a storm
            self._not_before = max(self._not_before, now + min(delay, self.settings.max_backoff_s))
            self._changed.notify_all()
