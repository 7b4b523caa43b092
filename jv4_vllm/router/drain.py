"""Graceful drain: on SIGTERM the router stops taking work, finishes what it took, then exits.

At the first SIGTERM (or Ctrl-C) ``/ready`` answers 503 at once, so load balancers stop
sending, and new model requests are refused with 503 and ``Retry-After``. Everything already
accepted (reading its body, waiting for admission, in vLLM, or being sent) runs to its end.
The server exits as soon as nothing is in flight, or when ``router.shutdown_grace_s`` has
passed, whichever comes first. A second signal ends the drain at once.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from jv4_vllm.errors import BackendUnavailableError
from jv4_vllm.router.errors import error_response

__all__ = ["Drain", "DrainMiddleware", "DrainingServer"]

log = logging.getLogger(__name__)
UNTRACKED = frozenset({"/health", "/ready", "/metrics"})  # probes neither count as work nor are refused
AFTER_DRAIN_S = 5.0  # uvicorn's own close of idle connections after the drain


class Drain:
    """Requests in flight, and whether the router is draining (set from a signal handler: plain flags)."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.in_flight = 0
        self.draining = False
        self.deadline = 0.0
        self.announced = False

    def begin(self) -> None:
        if not self.draining:
            self.deadline = time.monotonic() + self.grace_s
            self.draining = True

    def done(self) -> bool:
        return self.draining and (self.in_flight == 0 or time.monotonic() >= self.deadline)


class DrainMiddleware:
    """Counts the requests in flight; refuses new ones while draining."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNTRACKED:
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            refusal = error_response(BackendUnavailableError(
                "this router is shutting down; retry (another replica will answer)", code="shutting_down",
                retry_after=1.0))
            refusal.headers["connection"] = "close"
            await refusal(scope, receive, send)
            return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1


class DrainingServer(uvicorn.Server):
    """uvicorn, whose first exit signal starts a drain instead of closing the listener."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain.draining or sig not in (signal.SIGTERM, signal.SIGINT):
            super().handle_exit(sig, frame)  # a second signal: uvicorn's own shutdown, now
            return
        self.drain.begin()  # only flags here: the main loop's tick does the rest

    async def on_tick(self, counter: int) -> bool:
        if self.drain.done():
            if self.drain.in_flight:
                log.warning("drain: %d request(s) still in flight after %.0f s; exiting anyway",
                            self.drain.in_flight, self.drain.grace_s)
            else:
                log.info("drain: nothing in flight; exiting")
            return True
        if self.drain.draining and not self.drain.announced:
            self.drain.announced = True
            log.warning("shutting down: /ready is 503, new requests are refused; draining %d request(s) "
                        "for up to %.0f s", self.drain.in_flight, self.drain.grace_s)
        elif self.drain.draining and counter % 50 == 0:
            log.info("drain: %d request(s) in flight", self.drain.in_flight)
        return await super().on_tick(counter)
