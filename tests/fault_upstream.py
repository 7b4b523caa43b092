"""A loopback stand-in for a vLLM replica, for faults real vLLM cannot be made to produce on demand.

Subclasses answer ``/pooling`` (see :meth:`FaultUpstream.pooling`); ``/health`` always answers,
and every ``/pooling`` call is counted.
"""

from __future__ import annotations

from aiohttp import web

from jv4_vllm.deploy.launch import free_port


class FaultUpstream:
    """An aiohttp server on a free loopback port; use it as ``async with``."""

    def __init__(self) -> None:
        self.calls = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    async def pooling(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    async def _pooling(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        return await self.pooling(request)

    def routes(self) -> list[web.RouteDef]:
        """More routes, for subclasses that stand in for something other than a replica."""
        return []

    @staticmethod
    async def _health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def __aenter__(self) -> "FaultUpstream":
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_post("/pooling", self._pooling)
        app.add_routes(self.routes())
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()
