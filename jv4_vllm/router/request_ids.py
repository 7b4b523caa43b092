"""Every request gets an id: the caller's ``X-Request-ID`` when it sends a plain one, else a fresh one.

The id is echoed in the ``X-Request-ID`` response header and in every error body, and it tags
the log lines written while the request is served (:mod:`jv4_vllm.core.request_id`), so a
client's report of a 502 leads straight to the replica's own message in the log.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jv4_vllm.core.request_id import REQUEST_ID, accept_request_id

__all__ = ["HEADER", "RequestIdMiddleware"]

HEADER = "x-request-id"


class RequestIdMiddleware:
    """Plain ASGI, outermost: every answer carries the id, whatever layer produced it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        offered = next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == HEADER.encode()), None)
        request_id = accept_request_id(offered)
        token = REQUEST_ID.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER.encode()]
                message = {**message, "headers": [*headers, (HEADER.encode(), request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)
