"""The router's memory bound in bytes: request bodies admitted in arrival order against one budget.

Admission in tokens (:mod:`jv4_vllm.core.admission`) bounds the work sent to vLLM, not what the
router itself holds. A request body, and everything parsed, decoded and sent from it, lives in
the router from the first byte read until the response is sent; :class:`ByteBudget` lets a body
in only while the bodies held add up to at most ``limits.max_bytes_in_flight``. A body that does
not fit waits unread, so the connection's flow control pushes back on the client instead of the
router buffering it; a body larger than the whole budget is refused at once.

What a request makes beyond its body (a downloaded or converted image, a rendered PDF page, and
the base64 copy each gets in its ``/pooling`` call) is counted with :func:`hold_more` as it is
made. Those bytes never wait (an admitted request is not stalled halfway): the budget may run
over by them, and new bodies then wait until it is back under.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar

__all__ = ["HOLD_BYTES", "ByteBudget", "hold_more"]

# the current request's counter of extra bytes (set by the admission middleware around the app)
HOLD_BYTES: ContextVar[Callable[[int], None] | None] = ContextVar("jv4_hold_bytes", default=None)


def hold_more(size: int) -> None:
    """Count ``size`` more bytes against the current request's grant (a no-op outside a request)."""
    hold = HOLD_BYTES.get()
    if hold is not None:
        hold(size)


class ByteBudget:
    """FIFO grants of bytes; a grant is released by the caller when its request is done."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self, size: int) -> None:
        """Wait until ``size`` bytes fit (``size`` <= capacity: the caller refuses bigger ones)."""
        if not self._waiters and self.held + size <= self.capacity:
            self.held += size
            return
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, ready)
        self._waiters.append(entry)
        try:
            await ready
        except BaseException:
            if ready.done() and not ready.cancelled():
                self.release(size)  # granted just as it was cancelled
            else:
                self._waiters.remove(entry)
                self._wake()
            raise

    def take(self, size: int) -> None:
        """Count bytes already arriving (a chunked body's next chunk), without waiting."""
        self.held += size

    def release(self, size: int) -> None:
        self.held -= size
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.held + self._waiters[0][0] <= self.capacity:
            size, ready = self._waiters.popleft()
            self.held += size
            ready.set_result(None)
