"""A replay upstream: answers every ``POST /pooling`` with one recorded vLLM ``bytes`` response.

A benchmark instrument, not a test double: it does no work per request beyond reading the
request and writing the recorded body, so a router in front of it runs at its own ceiling.
Run as ``python -m jv4_vllm.bench.replay --body FILE --metadata FILE --port N``.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvicorn

__all__ = ["replay_app"]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def replay_app(body: bytes, metadata: str) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """A bare ASGI app (no framework: the instrument must cost less than what it measures)."""
    pooling_headers = [(b"content-type", b"application/octet-stream"), (b"metadata", metadata.encode()),
                       (b"content-length", str(len(body)).encode())]
    health_headers = [(b"content-type", b"text/plain"), (b"content-length", b"2")]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:  # drain the request body
            message = await receive()
            more = message.get("more_body", False)
        if scope["path"] == "/pooling":
            await send({"type": "http.response.start", "status": 200, "headers": pooling_headers})
            await send({"type": "http.response.body", "body": body})
        else:
            await send({"type": "http.response.start", "status": 200, "headers": health_headers})
            await send({"type": "http.response.body", "body": b"ok"})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--body", type=Path, required=True)
    parser.add_argument("--metadata", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = replay_app(args.body.read_bytes(), args.metadata.read_text(encoding="utf-8").strip())
    uvicorn.run(app, host="127.0.0.1", port=args.port, loop="uvloop", http="httptools", log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
