"""The client raises classes of ``jv4_vllm.errors`` whatever fails, and fetches its caller's own URLs.

A small loopback HTTP server stands in for what vLLM and the router never produce: a proxy's
HTML error page, a server that never answers, a 200 without embeddings. The last test embeds
an image from a loopback URL through the real router and the live deployments.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import numpy as np
import pytest
from aiohttp import web
from images_util import make_image, png_bytes

from jv4_vllm.client import AsyncClient
from jv4_vllm.client.retries import NO_RETRIES
from jv4_vllm.deploy.launch import free_port
from jv4_vllm import errors

pytestmark = pytest.mark.timeout(120)

PNG = png_bytes(make_image(48, 32))
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Upstream:
    """A loopback server whose /v1/embeddings answer the test sets; it also serves files at /files/NAME."""

    def __init__(self, embeddings: Handler | None = None, files: dict[str, bytes] | None = None) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.bodies: list[bytes] = []  # what the client posted
        self._embeddings, self._files = embeddings, files or {}

    async def _post(self, request: web.Request) -> web.StreamResponse:
        self.bodies.append(await request.read())
        if self._embeddings is None:
            return web.json_response({"error": {"message": "no answer set"}}, status=500)
        return await self._embeddings(request)

    async def _file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in self._files:
            return web.Response(status=404, text="not here")
        return web.Response(body=self._files[name], content_type="application/octet-stream")

    async def __aenter__(self) -> "Upstream":
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/embeddings", self._post)
        app.router.add_get("/files/{name}", self._file)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", int(self.url.rsplit(":", 1)[1])).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()


def answer(status: int, body: bytes, content_type: str = "text/html", **headers: str) -> Handler:
    async def handler(_: web.Request) -> web.StreamResponse:
        return web.Response(status=status, body=body, headers={"Content-Type": content_type, **headers})
    return handler


async def test_nothing_listening_is_service_unreachable() -> None:
    async with AsyncClient(f"http://127.0.0.1:{free_port()}", retries=NO_RETRIES) as client:
        with pytest.raises(errors.ServiceUnreachableError, match="cannot reach") as info:
            await client.encode_text(["a"])
    assert isinstance(info.value, errors.BackendUnavailableError) and info.value.code == "service_unreachable"


async def test_no_answer_in_time_is_a_backend_timeout() -> None:
    released = asyncio.Event()

    async def silent(_: web.Request) -> web.StreamResponse:
        await released.wait()  # answers only after the client has given up
        return web.Response(status=204)

    async with Upstream(silent) as upstream, AsyncClient(upstream.url, timeout=0.5) as client:
        with pytest.raises(errors.BackendTimeoutError, match="did not answer in time"):
            await client.encode_text(["a"])
        released.set()


async def unavailable_for_two_minutes(_: web.Request) -> web.StreamResponse:
    """A proxy's 503 whose Retry-After is an HTTP date, two minutes from when it answers."""
    when = format_datetime(datetime.now(timezone.utc) + timedelta(minutes=2), usegmt=True)
    return web.Response(status=503, text="Service Unavailable", headers={"Retry-After": when})


@pytest.mark.parametrize(("handler", "error", "message", "retry_after"), [
    (answer(502, b"<html><body><h1>502 Bad Gateway</h1></body></html>"), errors.BackendError, "502 Bad Gateway", None),
    (unavailable_for_two_minutes, errors.BackendUnavailableError, "Service Unavailable", (60.0, 120.0)),
    (answer(413, b"<html>Request Entity Too Large</html>"), errors.PayloadTooLargeError, "Too Large", None),
    (answer(404, b"<html>Not Found</html>"), errors.ModelNotFoundError, "Not Found", None),
    (answer(500, b"\xff\xfe oops"), errors.Jv4Error, "HTTP 500", None),
    (answer(429, b'{"error": {"message": "busy", "type": "rate_limit_error", "param": null, "code": "overloaded"}}',
            "application/json", **{"Retry-After": "7"}), errors.OverloadedError, "busy", (7.0, 7.0)),
    (answer(503, b"", "text/plain", **{"Retry-After": "soon"}), errors.BackendUnavailableError, "HTTP 503", None),
])
async def test_any_error_answer_is_a_class_of_the_tree(handler: Handler, error: type[errors.Jv4Error], message: str,
                                                      retry_after: tuple[float, float] | None) -> None:
    async with Upstream(handler) as upstream, AsyncClient(upstream.url, retries=NO_RETRIES) as client:
        with pytest.raises(errors.Jv4Error, match=message) as info:
            await client.encode_text(["a"])
    assert type(info.value) is error
    if retry_after is None:
        assert info.value.retry_after is None
    else:
        assert retry_after[0] <= info.value.retry_after <= retry_after[1]


@pytest.mark.parametrize("body", [b"<html>a login page</html>", b'{"object": "list"}', b'{"data": [{"index": 0}]}'])
async def test_a_success_without_embeddings_is_a_backend_error(body: bytes) -> None:
    async with Upstream(answer(200, body, "application/json")) as upstream, AsyncClient(upstream.url) as client:
        with pytest.raises(errors.BackendError, match="without the expected body"):
            await client.encode_text(["a"])


def test_retry_after_as_seconds_or_http_date() -> None:
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert errors.retry_after_seconds("5", now) == 5.0 and errors.retry_after_seconds("-3", now) == 0.0
    assert errors.retry_after_seconds("Thu, 01 Jan 2026 00:02:00 GMT", now) == 120.0
    assert errors.retry_after_seconds("Wed, 31 Dec 2025 23:00:00 GMT", now) == 0.0  # already past
    assert [errors.retry_after_seconds(v, now) for v in (None, "", "soon", "nan", "inf")] == [None] * 5


async def test_an_empty_batch_is_refused_before_anything_is_sent() -> None:
    async with Upstream() as upstream, AsyncClient(upstream.url) as client:
        for encode in (client.encode_text, client.encode_image):
            with pytest.raises(errors.InvalidRequestError, match="input is empty") as info:
                await encode([])
            assert info.value.param == "input"
    assert upstream.bodies == []


async def embeddings_of_one(_: web.Request) -> web.StreamResponse:
    vector = base64.b64encode(np.ones(4, "<f4").tobytes()).decode()
    return web.json_response({"object": "list", "model": "m", "data": [{"object": "embedding", "index": 0,
                              "embedding": vector}], "usage": {"prompt_tokens": 3, "total_tokens": 3}})


async def test_the_callers_own_loopback_url_is_fetched_and_sent_as_bytes() -> None:
    """The router would refuse this address; the client fetches it for its caller."""
    async with Upstream(embeddings_of_one, {"cat.png": PNG}) as upstream, AsyncClient(upstream.url) as client:
        vector = await client.encode_image(f"{upstream.url}/files/cat.png")
        assert vector.shape == (4,)
        sent = base64.b64decode(json.loads(upstream.bodies[0])["input"][0]["image"])
        assert sent == PNG
        missing = r"input\[1\]: fetching the image URL answered HTTP 404"
        with pytest.raises(errors.InvalidRequestError, match=missing) as info:
            await client.encode_image([PNG, f"{upstream.url}/files/missing.png"])
        assert info.value.code == "image_fetch_failed"
    assert len(upstream.bodies) == 1


async def test_the_byte_cap_still_holds_for_the_callers_urls() -> None:
    limit = 8 * 1024 * 1024  # the client's default max_image_bytes
    async with Upstream(embeddings_of_one, {"big.png": PNG + bytes(limit)}) as upstream, \
            AsyncClient(upstream.url) as client:
        with pytest.raises(errors.PayloadTooLargeError, match=f"larger than {limit} bytes"):
            await client.encode_image(f"{upstream.url}/files/big.png")
    assert upstream.bodies == []


@pytest.mark.vllm
async def test_an_image_from_a_loopback_url_embeds_through_the_router(router_url: str) -> None:
    image = png_bytes(make_image(96, 64, seed=3))
    async with Upstream(files={"photo.png": image}) as files, AsyncClient(router_url) as client:
        from_url = await client.encode_image(f"{files.url}/files/photo.png", task="retrieval")
        from_bytes = await client.encode_image(image, task="retrieval")
    np.testing.assert_allclose(from_url, from_bytes, rtol=0, atol=0)
    assert np.linalg.norm(from_url) == pytest.approx(1.0, abs=1e-5)


def test_a_client_needs_a_url_and_its_result_types_come_from_the_root() -> None:
    from jv4_vllm import Client, DenseAndMulti, RerankHit  # noqa: F401 - the import is the test

    with pytest.raises(TypeError):
        Client()  # type: ignore[call-arg]
    for url in ("", "   "):
        with pytest.raises(ValueError, match="router URL"):
            AsyncClient(url)
