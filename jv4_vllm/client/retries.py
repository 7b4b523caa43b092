"""When the client tries a request again: the service said "not now", or could not be reached.

A 429 (overloaded) or 503 (no healthy backend) answer is tried again after the server's
``Retry-After`` (or, without one, after a backoff); a connection that fails before any answer
(refused, reset, DNS) after a backoff that doubles. Both are bounded by a number of attempts
and by the total time spent waiting, and past either bound the last error is raised as the
server gave it. Timeouts and other errors are not retried: a request that timed out may
still be running, and a 4xx will not change.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from jv4_vllm.errors import (
    BackendUnavailableError,
    OverloadedError,
    ServiceUnreachableError,
)

__all__ = ["DEFAULT_RETRIES", "NO_RETRIES", "Retries"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Retries:
    """Bounds of the client's retries (``AsyncClient(url, retries=Retries(attempts=3))``)."""

    attempts: int = 5
    """Tries in all, the first included (1: never retry)."""
    max_wait_s: float = 60.0
    """Seconds spent waiting between tries, in all; a Retry-After past what is left gives up at once."""
    backoff_s: float = 0.5
    """First wait when the server names none (connection failures, 429/503 without Retry-After); doubles."""
    max_backoff_s: float = 8.0
    """Longest single backoff wait."""

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.max_wait_s < 0 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("Retries: attempts must be at least 1 and the waits at least 0")

    async def run(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """``attempt()`` until it succeeds or a bound is reached (then its last error propagates)."""
        waited, backoff = 0.0, self.backoff_s
        for tries in range(1, self.attempts + 1):
            try:
                return await attempt()
            except (OverloadedError, BackendUnavailableError) as error:
                if tries == self.attempts:
                    raise
                told = None if isinstance(error, ServiceUnreachableError) else error.retry_after
                wait = told if told is not None else min(backoff, self.max_backoff_s) * (0.5 + random.random() / 2)
                if waited + wait > self.max_wait_s:
                    raise
                backoff *= 2
            waited += wait
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


NO_RETRIES = Retries(attempts=1)
DEFAULT_RETRIES = Retries()
