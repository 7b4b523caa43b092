"""Replica discovery through a real DNS server on loopback, as with a Kubernetes headless Service.

A dnslib server answers one name with a changeable set of loopback addresses; stand-in
replicas listen on each address on one shared port. The pool must spread calls over every
address the name has, pick up an added one and drop a removed one, and refuse calls at
once when the name does not resolve.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import numpy as np
import pytest
import pytest_asyncio
import uvicorn
from dnslib import QTYPE, RCODE, RR, A
from dnslib.server import DNSLogger, DNSServer
from aiohttp import ClientResponse
from fastapi import FastAPI, Request, Response

from jv4_vllm.core.replicas import ReplicaPool
from jv4_vllm.config import BackendSettings
from jv4_vllm.errors import BackendUnavailableError
from jv4_vllm.core.stream import decode_body
from jv4_vllm.core.wire import pooling_wire_fields

pytestmark = pytest.mark.timeout(30)

NAME = "jv4-vllm-code.test."
ADDRESSES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")  # all of 127/8 is loopback on Linux
CALLS = 40
REFRESH_S = 0.2
ROWS = np.arange(12, dtype="<f2").reshape(3, 4)


class ChangeableZone:
    """A dnslib resolver for one name whose A records the test rewrites; other names do not exist."""

    def __init__(self, name: str, addresses: tuple[str, ...]) -> None:
        self.name = name
        self.addresses = addresses  # replaced whole, so the server thread never sees a half-made set

    def resolve(self, request, handler):
        reply = request.reply()
        qname = request.q.qname
        if str(qname).lower() != self.name:
            reply.header.rcode = RCODE.NXDOMAIN
        elif request.q.qtype == QTYPE.A:  # other types (AAAA): the name exists, no such record
            for address in self.addresses:
                reply.add_answer(RR(qname, QTYPE.A, rdata=A(address), ttl=0))
        return reply


@pytest.fixture(scope="module")
def zone() -> Iterator[ChangeableZone]:
    yield ChangeableZone(NAME, ADDRESSES[:2])


@pytest.fixture(scope="module")
def dns_server(zone: ChangeableZone) -> Iterator[str]:
    """``host:port`` of a UDP DNS server on a free loopback port serving ``zone``."""
    server = DNSServer(zone, address="127.0.0.1", port=0, logger=DNSLogger(logf=lambda _: None))
    server.start_thread()
    try:
        yield f"127.0.0.1:{server.server.server_address[1]}"
    finally:
        server.stop()
        server.server.server_close()


def _bind_shared_port(addresses: tuple[str, ...]) -> list[socket.socket]:
    """One listening socket per address, all on the same (free) port."""
    for _ in range(20):
        sockets: list[socket.socket] = []
        try:
            for address in addresses:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.bind((address, sockets[0].getsockname()[1] if len(sockets) > 1 else 0))
                sock.listen()
            return sockets
        except OSError:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no port free on every replica address")


def _replica_app(served: Counter[str]) -> FastAPI:
    """A vLLM stand-in: /health, and /pooling answering a small bytes response; counts calls per address."""
    app = FastAPI()

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.post("/pooling")
    async def pooling(request: Request) -> Response:
        served[request.scope["server"][0]] += 1
        body = ROWS.tobytes()
        item = {"index": 0, "embed_dtype": "float16", "endianness": "little",
                "start": 0, "end": len(body), "shape": list(ROWS.shape)}
        metadata = {"data": [item], "usage": {"prompt_tokens": ROWS.shape[0]}}
        return Response(body, media_type="application/octet-stream", headers={"metadata": json.dumps(metadata)})

    return app


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def replicas() -> AsyncIterator[tuple[int, Counter[str]]]:
    """Stand-in replicas on every address of ``ADDRESSES`` (one uvicorn server, one port): (port, calls served)."""
    served: Counter[str] = Counter()
    sockets = _bind_shared_port(ADDRESSES)
    config = uvicorn.Config(_replica_app(served), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=sockets))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield sockets[0].getsockname()[1], served
    finally:
        server.should_exit = True
        await task
        for sock in sockets:
            sock.close()


def _settings(dns_server: str) -> BackendSettings:
    """Fast DNS refresh and health checks; least-outstanding choice spreads a burst."""
    return BackendSettings(dns_server=dns_server, dns_refresh_s=REFRESH_S, health_interval_s=REFRESH_S,
                           connect_timeout_s=2.0, request_timeout_s=5.0)


@contextlib.asynccontextmanager
async def _pool(url: str, dns_server: str) -> AsyncIterator[ReplicaPool]:
    pool = ReplicaPool("code", [url], _settings(dns_server))
    await pool.start()
    try:
        yield pool
    finally:
        await pool.aclose()


async def _burst(pool: ReplicaPool, served: Counter[str]) -> Counter[str]:
    """CALLS concurrent /pooling calls; which address served how many. Every answer must decode."""
    served.clear()
    body = {"input": ["def add(a, b): return a + b"], "task": "token_embed", **pooling_wire_fields("float16")}
    async def read(response: ClientResponse) -> tuple[bytes, str]:
        return await response.read(), response.headers["metadata"]

    answers = await asyncio.gather(*(pool.call("/pooling", body, 1, read) for _ in range(CALLS)))
    for content, metadata in answers:
        rows, tokens = decode_body(content, metadata)
        np.testing.assert_array_equal(rows[0], ROWS)
        assert tokens == ROWS.shape[0]
    assert sum(served.values()) == CALLS
    return Counter(served)


async def _healthy_hosts_become(pool: ReplicaPool, port: int, addresses: tuple[str, ...]) -> None:
    """Wait (a few refresh periods at most) until the pool's healthy replicas are exactly ``addresses``."""
    wanted = {f"http://{address}:{port}" for address in addresses}
    deadline = time.monotonic() + 20 * REFRESH_S
    while {s.url for s in pool.stats() if s.healthy} != wanted or len(pool.stats()) != len(wanted):
        assert time.monotonic() < deadline, f"pool has {pool.stats()}, expected {sorted(wanted)}"
        await asyncio.sleep(REFRESH_S / 4)


@pytest.mark.asyncio(loop_scope="session")
async def test_pool_follows_the_dns_record(zone, dns_server, replicas) -> None:
    port, served = replicas
    zone.addresses = ADDRESSES[:2]
    async with _pool(f"dns+http://{NAME.rstrip('.')}:{port}", dns_server) as pool:
        await _healthy_hosts_become(pool, port, ADDRESSES[:2])
        counts = await _burst(pool, served)
        assert set(counts) == set(ADDRESSES[:2])
        assert min(counts.values()) >= CALLS // 4, counts  # neither is starved

        zone.addresses = ADDRESSES  # a third pod joins the headless Service
        await _healthy_hosts_become(pool, port, ADDRESSES)
        counts = await _burst(pool, served)
        assert set(counts) == set(ADDRESSES)
        assert min(counts.values()) >= CALLS // 6, counts

        zone.addresses = (ADDRESSES[0], ADDRESSES[2])  # one leaves; its server still answers /health
        await _healthy_hosts_become(pool, port, zone.addresses)
        counts = await _burst(pool, served)
        assert set(counts) == set(zone.addresses), counts


@pytest.mark.asyncio(loop_scope="session")
async def test_unresolvable_name_is_unavailable_at_once(dns_server, replicas) -> None:
    port, _ = replicas
    async with _pool(f"dns+http://jv4-vllm-missing.test:{port}", dns_server) as pool:
        assert pool.stats() == []
        assert not pool.healthy()
        with pytest.raises(BackendUnavailableError) as caught:
            await asyncio.wait_for(pool.call("/pooling", {"input": ["x"]}, 1, ClientResponse.read), timeout=2.0)
        assert caught.value.status == 503
