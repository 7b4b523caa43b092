"""A loopback stand-in for a vLLM replica, for faults real vLLM cannot be made to produce on demand.

Subclasses answer ``/pooling`` (see :meth:`FaultUpstream.pooling`); ``/health`` always answers,
and every ``/pooling`` call is counted. :class:`RouterProxy` stands in front of a real router
instead, for what a router's clients meet (overload answers, the bytes they send).
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
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_get("/health", self._health)
        app.router.add_post("/pooling", self._pooling)
        app.add_routes(self.routes())
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()


class RouterProxy(FaultUpstream):
    """A proxy in front of a real router's /v1/embeddings: its first ``fail`` answers are
    ``status`` with ``Retry-After: retry_after`` (a router's overload body), the rest forwarded.
    It counts the requests and the body bytes it was sent."""

    def __init__(self, target: str, *, fail: int = 0, status: int = 429, retry_after: str | None = "0.2") -> None:
        super().__init__()
        self.target, self.fail, self.status, self.retry_after = target.rstrip("/"), fail, status, retry_after
        self.bodies: list[bytes] = []

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/embeddings", self._embeddings)]

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        import aiohttp

        body = await request.read()
        self.bodies.append(body)
        if len(self.bodies) <= self.fail:
            headers = {"Retry-After": self.retry_after} if self.retry_after is not None else {}
            code = "overloaded" if self.status == 429 else "no_healthy_backend"
            return web.json_response({"error": {"message": f"busy ({len(self.bodies)})", "type": "rate_limit_error",
                                                "param": None, "code": code}}, status=self.status, headers=headers)
        async with aiohttp.ClientSession() as session:
            async with session.post(self.target + "/v1/embeddings", data=body,
                                    headers={"content-type": "application/json"}) as answer:
                return web.Response(body=await answer.read(), status=answer.status,
                                    content_type=answer.content_type)
