"""Admission under load: a full wait queue (counted in requests) is a 429 with Retry-After, a task with no
live replica a 503.

The router (``create_app(config)``, engine started in its lifespan) runs on a real uvicorn
server. Its one task's only replica is a slow stand-in on loopback: it answers /health at
once and holds every /pooling call until the test opens its gate, then answers the way
vLLM does (``encoding_format: bytes``: raw little-endian rows plus a ``metadata`` header),
one row of the prepared checkpoint's hidden size per prompt token.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from vllm_stack import InProcessServer, free_port

from jv4_vllm.config import Config
from jv4_vllm.router import create_app

pytestmark = pytest.mark.timeout(120)

TASK = "retrieval"
BODY = {"input": "hello there", "task": f"{TASK}.passage"}


class SlowReplica:
    """A vLLM stand-in whose /pooling answers wait for :attr:`gate`; it counts calls and their overlap."""

    def __init__(self, hidden_size: int) -> None:
        self.hidden_size = hidden_size
        self.url = ""  # set once served
        self.gate = asyncio.Event()
        self.calls = 0
        self.holding = 0
        self.max_holding = 0
        self.app = Starlette(routes=[Route("/health", self.health), Route("/pooling", self.pooling, methods=["POST"])])

    async def health(self, request: Request) -> Response:
        return Response()

    async def pooling(self, request: Request) -> Response:
        body = await request.json()
        self.calls += 1
        self.holding += 1
        self.max_holding = max(self.max_holding, self.holding)
        try:
            await self.gate.wait()
        finally:
            self.holding -= 1
        return self._bytes_response(body)

    async def wait_holding(self, count: int, timeout_s: float = 10.0) -> None:
        async with asyncio.timeout(timeout_s):
            while self.holding < count:
                await asyncio.sleep(0.01)

    def _bytes_response(self, body: dict[str, Any]) -> Response:
        """One float16 row per token id of each prompt, laid out as vLLM lays out a bytes response."""
        assert body["encoding_format"] == "bytes" and body["endianness"] == "little", body
        dtype = {"float16": "<f2", "float32": "<f4"}[body["embed_dtype"]]
        rng = np.random.default_rng(len(body["input"]))
        chunks: list[bytes] = []
        items: list[dict[str, Any]] = []
        offset = 0
        for index, ids in enumerate(body["input"]):
            rows = rng.standard_normal((len(ids), self.hidden_size)).astype(dtype).tobytes()
            items.append({"index": index, "embed_dtype": body["embed_dtype"], "endianness": "little",
                          "start": offset, "end": offset + len(rows), "shape": [len(ids), self.hidden_size]})
            chunks.append(rows)
            offset += len(rows)
        tokens = sum(len(ids) for ids in body["input"])
        metadata = {"id": "pool-0", "created": 0, "model": body["model"], "data": items,
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return Response(b"".join(chunks), media_type="application/octet-stream",
                        headers={"metadata": json.dumps(metadata)})


def make_config(prepared_dir: Path, replica_url: str) -> Config:
    return Config.model_validate({
        "prepared_dir": str(prepared_dir),
        "router": {"host": "127.0.0.1", "port": free_port(), "api_keys_env": "JV4_TEST_UNSET_KEYS"},
        "deployments": {TASK: {"urls": [replica_url]}},
        "vllm": {"max_model_len": 512},
        "backend": {"tokens_in_flight_per_replica": 1, "max_queue": 1, "health_interval_s": 0.5},
    })


def hidden_size(prepared_dir: Path) -> int:
    return int(json.loads((prepared_dir / TASK / "jv4.json").read_text())["hidden_size"])


@pytest.fixture
async def slow_replica(prepared_dir: Path) -> AsyncIterator[SlowReplica]:
    replica = SlowReplica(hidden_size(prepared_dir))
    server = InProcessServer(replica.app, free_port())
    replica.url = server.url
    await server.__aenter__()
    try:
        yield replica
    finally:
        replica.gate.set()  # never leave a held call behind, whatever the test did
        await server.__aexit__(None, None, None)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus exposition ``text`` (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def assert_error(response: httpx.Response, status: int, error_type: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code", "request_id"} and error["type"] == error_type
    assert int(response.headers["retry-after"]) >= 1


def assert_embedded(response: httpx.Response, size: int) -> None:
    assert response.status_code == 200, response.text
    [item] = response.json()["data"]
    vector = np.asarray(item["embedding"], dtype=np.float32)
    assert vector.shape == (size,) and abs(float(np.linalg.norm(vector)) - 1.0) < 1e-4


async def test_full_queue_is_a_429_then_the_held_requests_succeed(prepared_dir: Path,
                                                                  slow_replica: SlowReplica) -> None:
    config = make_config(prepared_dir, slow_replica.url)
    async with InProcessServer(create_app(config), config.router.port) as router, \
            httpx.AsyncClient(base_url=router.url, timeout=30) as client:
        assert (await client.get("/ready")).status_code == 200
        sent = [asyncio.create_task(client.post("/v1/embeddings", json=BODY)) for _ in range(3)]
        # One call is held by the replica, one waits in the queue, the third finds the queue full.
        done, pending = await asyncio.wait(sent, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1 and len(pending) == 2
        refused = done.pop().result()
        assert_error(refused, 429, "rate_limit_error")
        assert refused.json()["error"]["code"] == "overloaded"
        await slow_replica.wait_holding(1)
        await asyncio.sleep(0.3)  # time for a wrongly admitted second call to reach the replica
        assert slow_replica.calls == 1 and not any(task.done() for task in pending)
        held = (await client.get("/metrics")).text
        assert metric(held, "jv4_waiting_requests", task=TASK) == 1 and metric(held, "jv4_admitted_tokens", task=TASK) == 1

        slow_replica.gate.set()
        for response in await asyncio.gather(*pending):
            assert_embedded(response, slow_replica.hidden_size)
        assert slow_replica.calls == 2 and slow_replica.max_holding == 1

        # Capacity is back: a fresh pair (one runs, one queues) both succeed.
        again = await asyncio.gather(*(client.post("/v1/embeddings", json=BODY) for _ in range(2)))
        for response in again:
            assert_embedded(response, slow_replica.hidden_size)
        assert slow_replica.max_holding == 1

        text = (await client.get("/metrics")).text
    labels = {"route": "/v1/embeddings", "task": TASK}
    assert metric(text, "jv4_requests_total", status="429", **labels) == 1
    assert metric(text, "jv4_errors_total", status="429", type="rate_limit_error", **labels) == 1
    assert metric(text, "jv4_requests_total", status="200", **labels) == 4
    assert metric(text, "jv4_backend_in_flight", task=TASK) == 0
    assert metric(text, "jv4_admitted_tokens", task=TASK) == 0 and metric(text, "jv4_waiting_requests", task=TASK) == 0


async def test_no_live_replica_is_a_503_with_retry_after(prepared_dir: Path) -> None:
    config = make_config(prepared_dir, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    async with InProcessServer(create_app(config), config.router.port) as router, \
            httpx.AsyncClient(base_url=router.url, timeout=30) as client:
        response = await client.post("/v1/embeddings", json=BODY)
        assert_error(response, 503, "service_unavailable")
        assert response.json()["error"]["code"] == "no_healthy_backend"
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/ready")).status_code == 503
        text = (await client.get("/metrics")).text
    assert metric(text, "jv4_errors_total", route="/v1/embeddings", task=TASK, status="503",
                  type="service_unavailable") == 1
    assert metric(text, "jv4_task_ready", task=TASK) == 0
