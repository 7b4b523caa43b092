"""What gets in, and what may keep running: API keys, the body caps, client disconnects.

:class:`AdmissionMiddleware` is plain ASGI so it acts before any parsing: a bad key is a
401 whatever the body holds, and an oversized body is a 413 decided from
``Content-Length`` or, for chunked uploads, while the body streams in (it is never
buffered past the cap). Every body then holds its bytes of the router's byte budget
(:class:`~jv4_vllm.router.byte_budget.ByteBudget`) until its response has been sent; a body
that does not fit yet waits unread. A chunked body (no ``Content-Length``) starts once the
budget has room and counts its chunks as they arrive. :func:`until_disconnect` runs a request's work and cancels it
when the client goes away, so abandoned requests stop costing backend calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jv4_vllm.errors import Jv4Error, PayloadTooLargeError
from jv4_vllm.router.auth import ApiKeys
from jv4_vllm.router.byte_budget import HOLD_BYTES, ByteBudget
from jv4_vllm.router.errors import error_response

__all__ = ["CLIENT_CLOSED_REQUEST", "AdmissionMiddleware", "until_disconnect"]

T = TypeVar("T")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away"
PROTECTED_PREFIX = "/v1/"
PROTECTED_PATHS = frozenset({"/rerank"})  # aliases outside /v1/ that do model work
_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})


class AdmissionMiddleware:
    """API keys on ``/v1/*`` and ``/rerank``, and the request body cap, before the application sees a byte."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, max_body_bytes: int, budget: ByteBudget) -> None:
        self.app = app
        self.keys = keys
        self.max_body_bytes = max_body_bytes
        self.budget = budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            if scope["path"].startswith(PROTECTED_PREFIX) or scope["path"] in PROTECTED_PATHS:
                self.keys.check(headers.get("authorization"))
            if scope["method"] in _BODYLESS:
                await self.app(scope, receive, send)
                return
            declared = headers.get("content-length", "")
            size = int(declared) if declared.isdigit() else None
            if size is not None and size > self.max_body_bytes:
                raise self._too_large()
            if size is not None and size > self.budget.capacity:
                raise PayloadTooLargeError(
                    f"the request body is {size} bytes; this router holds at most {self.budget.capacity} bytes of "
                    "requests at once (limits.max_bytes_in_flight): split it", code="exceeds_bytes_in_flight")
        except Jv4Error as error:
            scope.setdefault("state", {})["error_type"] = error.type
            await error_response(error)(scope, receive, send)
            return
        held = [size or 0]  # bytes of the budget this request holds (a chunked body adds as it arrives)
        await self.budget.acquire(held[0])
        try:
            try:
                body = await self._read_body(receive, counted=None if size is not None else held)
            except Jv4Error as error:  # a chunked body over the cap
                scope.setdefault("state", {})["error_type"] = error.type
                await error_response(error)(scope, receive, send)
                return
            if body is None:  # the client left while sending
                return
            replay = _replay(body, receive)
            del body  # from here the app's copy is the only one

            def hold(size: int) -> None:
                self.budget.take(size)
                held[0] += size

            token = HOLD_BYTES.set(hold)
            try:
                await self.app(scope, replay, send)
            finally:
                HOLD_BYTES.reset(token)
        finally:
            self.budget.release(held[0])

    def _too_large(self) -> PayloadTooLargeError:
        return PayloadTooLargeError(f"the request body is larger than {self.max_body_bytes} bytes")

    async def _read_body(self, receive: Receive, counted: list[int] | None) -> bytes | None:
        """The whole body (None if the client left); with ``counted``, each chunk is taken from the
        budget as it comes and added there."""
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            if counted is not None:
                self.budget.take(len(chunk))
                counted[0] += len(chunk)
            body += chunk
            if len(body) > self.max_body_bytes:
                raise self._too_large()
            if not message.get("more_body", False):
                return bytes(body)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that yields the buffered body once, then the connection's own messages."""
    pending: list[bytes] = [body]  # emptied once sent: the app's copy is then the only one

    async def replay() -> Message:
        if pending:
            return {"type": "http.request", "body": pending.pop(), "more_body": False}
        return await receive()

    return replay


async def _disconnected(receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work: Awaitable[T]) -> tuple[bool, T | None]:
    """Run ``work``; cancel it if the client disconnects first. Returns (finished, result)."""
    job = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({job, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not job.done():  # the client left, or this handler itself was cancelled
            job.cancel()
        watcher.cancel()
        await asyncio.gather(job, watcher, return_exceptions=True)
    if job.cancelled():
        return False, None
    return True, job.result()
