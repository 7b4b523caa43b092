"""Where a job's requests go: a router over HTTP, or the same app in-process over the engine.

``--config`` runs the router's ASGI app inside the job (through ``httpx.ASGITransport``)
on an engine that talks straight to the vLLM deployments, as ``Client.direct`` does, so a
body means the same thing and is refused the same way on both paths.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from jv4_vllm.bulk.pacing import Pacer
from jv4_vllm.errors import retry_after_seconds

__all__ = ["Answer", "RetrySettings", "Transport", "send"]

OVERLOAD = frozenset({429, 503})
MAYBE_TRANSIENT = frozenset({500, 502, 504})
IN_PROCESS_BASE = "http://in-process"


@dataclass(frozen=True)
class Answer:
    status: int
    content: bytes
    request_id: str | None
    attempts: int


@dataclass(frozen=True)
class RetrySettings:
    server_error_retries: int = 4  # 500/502/504 retried this often, then written as they are
    give_up_after_s: float | None = None  # 429/503/unreachable: retried until this (None: forever)


class Transport:
    """An ``httpx.AsyncClient`` aimed at a router or at the in-process app."""

    def __init__(self, http: httpx.AsyncClient, engine: Any = None) -> None:
        self.http = http
        self._engine = engine

    @classmethod
    def router(cls, url: str, *, api_key: str | None = None, timeout_s: float = 600.0) -> Transport:
        headers = {"content-type": "application/json"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
        return cls(httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, limits=limits,
                                     timeout=httpx.Timeout(timeout_s, connect=10.0)))

    @classmethod
    async def in_process(cls, config_path: str | Path, *, timeout_s: float = 600.0) -> Transport:
        from jv4_vllm.config import load_config
        from jv4_vllm.core.engine import Engine
        from jv4_vllm.router import create_app

        config = load_config(config_path)
        engine = await Engine.start(config)
        # The app is reachable only from this process: no API keys to check.
        open_router = config.router.model_copy(update={"api_keys_env": "", "api_keys_file": None})
        app = create_app(config.model_copy(update={"router": open_router}), engine)
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=IN_PROCESS_BASE,
                                 headers={"content-type": "application/json"}, timeout=timeout_s)
        return cls(http, engine)

    async def aclose(self) -> None:
        await self.http.aclose()
        if self._engine is not None:
            await self._engine.aclose()


async def send(transport: Transport, pacer: Pacer, path: str, body: bytes, *, items: int,
               retry: RetrySettings, ahead: bool = False) -> Answer:
    """POST ``body`` until the service gives an answer that is not overload or an outage
    (``ahead``: before requests that wait without it)."""
    started = time.monotonic()
    attempt = 0
    server_errors = 0
    while True:
        attempt += 1
        await pacer.acquire(ahead=ahead)
        sent = time.monotonic()
        try:
            response = await transport.http.post(path, content=body)
        except httpx.TransportError:
            if _gave_up(retry, started):
                await pacer.abandon()
                raise
            await pacer.unreachable(attempt)
            continue
        except BaseException:
            await pacer.abandon()
            raise
        status = response.status_code
        if status in OVERLOAD and not _gave_up(retry, started):
            await pacer.overloaded(retry_after_seconds(response.headers.get("retry-after")), attempt)
            continue
        if status in MAYBE_TRANSIENT and server_errors < retry.server_error_retries:
            server_errors += 1
            await pacer.server_error(server_errors)
            continue
        await pacer.done(time.monotonic() - sent, items)
        return Answer(status, response.content, response.headers.get("x-request-id"), attempt)


def _gave_up(retry: RetrySettings, started: float) -> bool:
    return retry.give_up_after_s is not None and time.monotonic() - started > retry.give_up_after_s
