"""A router that protects itself and its neighbours, on real vLLM behind loopback proxies.

The proxies (:class:`Forwarding`) pass every call to a real vLLM deployment; they only add what
real vLLM cannot be made to do on demand: a 500 for one poison input, or a slow answer.
"""

from __future__ import annotations

import asyncio
import base64
import io
import signal
import sys
import time
from pathlib import Path

import aiohttp
import httpx
import pytest
from aiohttp import web
from fault_upstream import FaultUpstream
from PIL import Image
from test_pdf import make_pdf
from vllm_stack import InProcessServer, free_port, wait_ready, write_config

from jv4_vllm.deploy.launch import spawn, stop_children
from jv4_vllm.router import create_app

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

TASK = "retrieval"


class Forwarding(FaultUpstream):
    """Forwards /pooling to a real vLLM; answers 500 (as a broken kernel does) for bodies holding ``poison``."""

    def __init__(self, target: str, poison: bytes | None = None, delay: float = 0.0) -> None:
        super().__init__()
        self.target, self.poison, self.delay = target, poison, delay

    async def pooling(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        if self.poison and self.poison in raw:
            return web.json_response({"error": {"message": "CUDA error: an illegal memory access"}}, status=500)
        await asyncio.sleep(self.delay)
        async with aiohttp.ClientSession() as session, \
                session.post(f"{self.target}/pooling", data=raw, headers={"content-type": "application/json"}) as r:
            headers = {k: v for k, v in r.headers.items() if k.lower() in ("metadata", "content-type")}
            return web.Response(body=await r.read(), status=r.status, headers=headers)


def png(color: tuple[int, int, int]) -> str:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


async def router_process(vllm_stack, tmp_path: Path, urls: list[str], **sections: dict):  # noqa: ANN001
    """`jv4-vllm router` over ``urls`` as the retrieval task; returns (child, url)."""
    config = vllm_stack.model_copy(update={
        "deployments": {TASK: vllm_stack.deployments[TASK].model_copy(update={"urls": urls})},
        "router": vllm_stack.router.model_copy(update={"port": free_port(), **sections.get("router", {})}),
        "backend": vllm_stack.backend.model_copy(update=sections.get("backend", {})),
        "limits": vllm_stack.limits.model_copy(update=sections.get("limits", {})),
        "log_dir": tmp_path,
    })
    path = write_config(config, tmp_path / "router.yaml")
    child = spawn("router", [sys.executable, "-m", "jv4_vllm.cli", "router", "--config", str(path)], tmp_path)
    url = f"http://127.0.0.1:{config.router.port}"
    try:
        await asyncio.to_thread(wait_ready, url, child.process)  # the proxies answer on this loop meanwhile
    except BaseException:
        stop_children([child])
        raise
    return child, url


def peak_rss_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no VmHWM")


async def test_a_poison_image_resent_in_a_loop_fails_no_other_request(vllm_stack, tmp_path):
    poison = png((250, 3, 7))
    target = vllm_stack.deployments[TASK].urls[0]
    async with Forwarding(target, poison.encode()[:200]) as one, Forwarding(target, poison.encode()[:200]) as two:
        child, url = await router_process(vllm_stack, tmp_path, [one.url, two.url])
        try:
            stop = asyncio.Event()
            answers: list[httpx.Response] = []

            async def poisoner(client: httpx.AsyncClient) -> None:
                while not stop.is_set():
                    answers.append(await client.post(f"{url}/v1/embeddings", json={
                        "input": [{"image": poison}], "task": "retrieval.passage"}))

            async def others(client: httpx.AsyncClient) -> list[int]:
                statuses = []
                for n in range(20):
                    response = await client.post(f"{url}/v1/embeddings", json={
                        "input": [f"another client's text {n}", {"image": png((n, 100, 200))}],
                        "task": "retrieval.query"})
                    statuses.append(response.status_code)
                    await asyncio.sleep(0.1)
                stop.set()
                return statuses

            async with httpx.AsyncClient(timeout=60) as a, httpx.AsyncClient(timeout=60) as b:
                loop = asyncio.create_task(poisoner(a))
                statuses = await others(b)
                await loop
        finally:
            stop_children([child])
    assert statuses == [200] * 20  # zero collateral failures
    assert len(answers) > 20 and {r.status_code for r in answers} == {502}
    error = answers[-1].json()["error"]
    assert error["param"] == "input[0]" and error["code"] == "input_failed"
    assert error["request_id"] == answers[-1].headers["x-request-id"]
    for response in answers:
        assert "CUDA" not in response.text and "127.0.0.1" not in response.text
    log = (tmp_path / "router.log").read_text()
    assert any(error["request_id"] in line and "CUDA error" in line and "127.0.0.1" in line
               for line in log.splitlines())


async def test_sigterm_drains_requests_in_flight_and_queued(vllm_stack, tmp_path):
    async with Forwarding(vllm_stack.deployments[TASK].urls[0], delay=1.5) as slow:
        # A budget of one request at a time: of four requests, one is in vLLM and three wait.
        child, url = await router_process(vllm_stack, tmp_path, [slow.url], router={"shutdown_grace_s": 60},
                                          backend={"tokens_in_flight_per_replica": 150})
        try:
            async with httpx.AsyncClient(timeout=120) as client:
                jobs = [asyncio.create_task(client.post(f"{url}/v1/embeddings", json={
                    "input": ["hello world " * 8 + str(n)], "task": "retrieval.query"})) for n in range(4)]
                await asyncio.sleep(0.7)
                child.process.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                ready = await client.get(f"{url}/ready")
                refused = await client.post(f"{url}/v1/embeddings", json={"input": ["late"], "task": "retrieval"})
                answers = await asyncio.gather(*jobs)
            code = await asyncio.to_thread(child.process.wait, 60)
        finally:
            stop_children([child])
    assert ready.status_code == 503 and ready.json()["status"] == "shutting_down"
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    assert [r.status_code for r in answers] == [200] * 4
    assert code == 0 and slow.calls == 4


BOUND = 16 << 20


async def test_a_burst_of_big_bodies_stays_within_the_byte_bound(vllm_stack, tmp_path):
    """Eight 6 MiB bodies at once under a 16 MiB bound: all served, peak RSS grows by at most 4x the bound."""
    body = httpx.Request("POST", "/", json={"input": ["lorem ipsum dolor sit amet " * ((6 << 20) // 27)],
                                            "task": "retrieval.passage", "truncate": True}).content
    child, url = await router_process(vllm_stack, tmp_path, vllm_stack.deployments[TASK].urls,
                                      limits={"max_bytes_in_flight": BOUND})
    try:
        async with httpx.AsyncClient(timeout=300) as client:
            assert (await client.post(f"{url}/v1/embeddings", json={"input": ["warm"], "task": "retrieval"})).is_success
            before = peak_rss_mib(child.process.pid)
            answers = await asyncio.gather(*(client.post(f"{url}/v1/embeddings", content=body,
                                                         headers={"content-type": "application/json"})
                                             for _ in range(8)))
            too_big = await client.post(f"{url}/v1/embeddings", content=b" " * (BOUND + 1),
                                        headers={"content-type": "application/json"})
        grown = peak_rss_mib(child.process.pid) - before
    finally:
        stop_children([child])
    assert [r.status_code for r in answers] == [200] * 8
    assert grown <= 4 * (BOUND >> 20), f"peak RSS grew {grown} MiB for a {BOUND >> 20} MiB bound"
    assert too_big.status_code == 413 and "max_bytes_in_flight" in too_big.json()["error"]["message"]


async def test_a_large_multivector_response_is_streamed(vllm_stack, tmp_path):
    child, url = await router_process(vllm_stack, tmp_path, vllm_stack.deployments[TASK].urls)
    texts = ["hello world " * 300 + str(n) for n in range(12)]
    try:
        async with httpx.AsyncClient(timeout=300) as client:
            small = await client.post(f"{url}/v1/embeddings", json={"input": ["warm"], "task": "retrieval",
                                                                      "return_multivector": True})
            assert small.status_code == 200
            before = peak_rss_mib(child.process.pid)
            async with client.stream("POST", f"{url}/v1/embeddings", json={
                    "input": texts, "task": "retrieval.passage", "return_multivector": True}) as response:
                assert response.status_code == 200 and "content-length" not in response.headers
                size, chunks = 0, 0
                async for chunk in response.aiter_raw():
                    size, chunks = size + len(chunk), chunks + 1
            grown = peak_rss_mib(child.process.pid) - before
    finally:
        stop_children([child])
    assert size > 20 << 20 and chunks > 10
    # The router holds the result arrays (float32) anyway; the JSON text must not exist whole on top.
    rows = 12 * 2400  # about 2,400 tokens per text
    arrays_mib = rows * 128 * 4 / (1 << 20)
    assert grown < arrays_mib + 0.6 * (size >> 20), f"peak RSS grew {grown} MiB for a {size >> 20} MiB response"


async def test_a_pdf_over_the_render_time_limit_is_a_4xx_naming_it(vllm_stack):
    config = vllm_stack.model_copy(update={
        "router": vllm_stack.router.model_copy(update={"port": free_port()}),
        "limits": vllm_stack.limits.model_copy(update={"pdf_render_timeout_s": 0.001, "render_dpi": 300.0})})
    pdf = base64.b64encode(make_pdf([(612, 792)] * 6)).decode()
    async with InProcessServer(create_app(config), config.router.port) as server, \
            httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        started = time.monotonic()
        response = await client.post("/v1/embeddings", json={"input": ["text", {"pdf": pdf}], "task": "retrieval"})
        took = time.monotonic() - started
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["param"] == "input[1]" and error["code"] == "pdf_render_timeout"
    assert "pdf_render_timeout_s" in error["message"], took


class HeldImageHost(FaultUpstream):
    """An image host that sends nothing until the test releases it."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.requests = 0

    async def __aenter__(self) -> "HeldImageHost":
        app = web.Application()
        app.router.add_get("/slow.png", self._image)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def _image(self, _: web.Request) -> web.Response:
        self.requests += 1
        await self.release.wait()
        return web.Response(body=base64.b64decode(png((1, 2, 3))), content_type="image/png")


async def test_slow_urls_and_pdfs_do_not_hold_up_a_plain_image(vllm_stack, monkeypatch):
    """Four held image URLs and four big PDFs in flight (each enough to fill the old shared gate of
    four): a plain image request is still answered while they wait; cancelling them (the clients
    leave) keeps their work from ever reaching vLLM."""
    from jv4_vllm.core import images

    monkeypatch.setattr(images, "address_allowed", lambda address: True)  # the held host is on loopback
    pdf = base64.b64encode(make_pdf([(612, 792)] * 30)).decode()
    async with Forwarding(vllm_stack.deployments[TASK].urls[0]) as counted, HeldImageHost() as host:
        config = vllm_stack.model_copy(update={
            "deployments": {TASK: vllm_stack.deployments[TASK].model_copy(update={"urls": [counted.url]})},
            "router": vllm_stack.router.model_copy(update={"port": free_port()}),
            "limits": vllm_stack.limits.model_copy(update={
                "allow_image_urls": True, "image_url_timeout_s": 300.0, "render_dpi": 300.0,
                "max_image_pixels": 40_000_000})})
        async with InProcessServer(create_app(config), config.router.port) as server, \
                httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            slow = [asyncio.create_task(client.post("/v1/embeddings", json={
                "input": [{"image": f"{host.url}/slow.png"}], "task": "retrieval"})) for _ in range(4)]
            slow += [asyncio.create_task(client.post("/v1/embeddings", json={
                "input": [{"pdf": pdf}], "task": "retrieval"})) for _ in range(4)]
            while host.requests < 4:
                await asyncio.sleep(0.05)
            plain = await asyncio.wait_for(client.post("/v1/embeddings", json={
                "input": [{"image": png((9, 9, 9))}], "task": "retrieval"}), timeout=60)
            assert plain.status_code == 200, plain.text
            assert not any(job.done() for job in slow[:4])  # every held URL still in flight
            assert not all(job.done() for job in slow[4:])  # PDFs queue behind each other, not before images
            for job in slow:
                job.cancel()
            await asyncio.gather(*slow, return_exceptions=True)
            host.release.set()
            await asyncio.sleep(1.0)
    assert counted.calls == 1  # only the plain image reached vLLM
