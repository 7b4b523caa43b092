"""Failure semantics of the router, with a fault-injecting upstream for what real vLLM cannot be
made to do on demand: malformed answers, stalls, 5xx. Plus the per-request token cap (decided
before anything is sent) and per-task readiness with one task's deployment down (real vLLM).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from aiohttp import web
from fault_upstream import FaultUpstream
from vllm_stack import InProcessServer

from jv4_vllm.config import Config
from jv4_vllm.core import engine as engine_module
from jv4_vllm.deploy.launch import free_port
from jv4_vllm.router import create_app

pytestmark = pytest.mark.timeout(180)

TASK = "retrieval"
RNG_ROWS = np.random.default_rng(3)
BODY = {"input": ["hello there"], "task": f"{TASK}.passage"}


class FaultyUpstream(FaultUpstream):
    """Answers /pooling the way ``mode`` says."""

    def __init__(self, hidden: int, mode: str) -> None:
        super().__init__()
        self.hidden, self.mode = hidden, mode

    async def pooling(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        tokens = len(body["input"][0])
        rows = np.ones((tokens, self.hidden), dtype="<f2").tobytes()
        item = {"index": 0, "embed_dtype": "float16", "endianness": "little", "start": 0, "end": len(rows),
                "shape": [tokens, self.hidden]}
        meta = {"data": [item], "usage": {"prompt_tokens": tokens}}
        if self.mode == "stall":
            await asyncio.sleep(5)  # far past the router's 1 s timeout
        if self.mode == "bad-metadata":
            return web.Response(body=rows, headers={"metadata": "{not json"})
        if self.mode == "wrong-size":
            item["shape"] = [tokens + 3, self.hidden]
            return web.Response(body=rows, headers={"metadata": json.dumps(meta)})
        if self.mode == "short-body":
            return web.Response(body=rows[: len(rows) // 2 + 1], headers={"metadata": json.dumps(meta)})
        if self.mode == "overflow":  # what an fp16 overflow inside the model looks like on the wire
            values = np.ones((tokens, self.hidden), dtype="<f2")
            values[tokens // 2, 7] = np.inf
            return web.Response(body=values.tobytes(), headers={"metadata": json.dumps(meta)})
        if self.mode == "drop-once" and self.calls == 1:  # the replica dies halfway through its answer
            values = RNG_ROWS.standard_normal((tokens, self.hidden)).astype("<f2").tobytes()
            response = web.StreamResponse(headers={"metadata": json.dumps(meta)})
            response.content_length = len(values)
            await response.prepare(request)
            await response.write(values[: len(values) // 2])
            request.transport.close()
            return response
        if self.mode == "500":
            return web.json_response({"error": {"message": "CUDA error: an illegal memory access"}}, status=500)
        return web.Response(body=rows, headers={"metadata": json.dumps(meta)})


def hidden_size(prepared_dir: Path) -> int:
    return int(json.loads((prepared_dir / TASK / "jv4.json").read_text())["hidden_size"])


@asynccontextmanager
async def router(prepared_dir: Path, urls: list[str], **settings: object) -> AsyncIterator[httpx.AsyncClient]:
    limits = settings.pop("limits", {})
    config = Config.model_validate({
        "prepared_dir": str(prepared_dir),
        "router": {"host": "127.0.0.1", "port": free_port(), "api_keys_env": "JV4_TEST_UNSET_KEYS"},
        "deployments": {TASK: {"urls": urls}},
        "vllm": {"max_model_len": 512},
        "backend": {"health_interval_s": 60, "request_timeout_s": 1.0, **settings},
        "limits": limits,
    })
    async with InProcessServer(create_app(config), config.router.port) as server, \
            httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        yield client


@pytest.mark.parametrize("mode", ["bad-metadata", "wrong-size", "short-body"])
async def test_a_malformed_answer_is_a_502(prepared_dir: Path, mode: str) -> None:
    async with FaultyUpstream(hidden_size(prepared_dir), mode) as upstream, \
            router(prepared_dir, [upstream.url]) as client:
        response = await client.post("/v1/embeddings", json=BODY)
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["type"] == "backend_error" and "backend" in error["message"]
    assert upstream.calls == 1


@pytest.mark.parametrize("multivector", [False, True])
async def test_inf_in_the_hidden_states_is_a_502_naming_the_input(prepared_dir: Path, multivector: bool) -> None:
    async with FaultyUpstream(hidden_size(prepared_dir), "overflow") as upstream, \
            router(prepared_dir, [upstream.url]) as client:
        response = await client.post("/v1/embeddings", json={**BODY, "return_multivector": multivector})
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert "input[0]" in error["message"] and error["param"] == "input[0]"
    assert "inf or NaN" not in error["message"] and error["request_id"] in error["message"]


@pytest.mark.parametrize("multivector", [False, True])
async def test_an_answer_broken_off_midway_is_retried_and_leaves_no_trace(
        prepared_dir: Path, multivector: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small slabs, so rows of the broken answer are folded before the connection drops; the
    retry's vector must equal a clean answer's, not carry the first attempt's rows too."""
    monkeypatch.setattr(engine_module, "SLAB_BYTES", 256)
    body = {"input": ["hello there " * 20], "task": f"{TASK}.passage", "return_multivector": multivector}
    hidden = hidden_size(prepared_dir)
    async with FaultyUpstream(hidden, "ok") as clean, router(prepared_dir, [clean.url]) as client:
        want = (await client.post("/v1/embeddings", json=body)).json()["data"][0]
    async with FaultyUpstream(hidden, "drop-once") as flaky, router(prepared_dir, [flaky.url]) as client:
        response = await client.post("/v1/embeddings", json=body)
    assert response.status_code == 200, response.text
    assert flaky.calls == 2
    key = "embeddings" if multivector else "embedding"
    np.testing.assert_array_equal(np.asarray(response.json()["data"][0][key]), np.asarray(want[key]))


async def test_a_stall_is_a_504_and_is_not_retried(prepared_dir: Path) -> None:
    hidden = hidden_size(prepared_dir)
    async with FaultyUpstream(hidden, "stall") as one, FaultyUpstream(hidden, "stall") as two, \
            router(prepared_dir, [one.url, two.url]) as client:
        response = await client.post("/v1/embeddings", json=BODY)
    assert response.status_code == 504, response.text
    assert response.json()["error"]["type"] == "timeout"
    assert one.calls + two.calls == 1


async def test_vllms_5xx_message_goes_to_the_log_under_the_request_id(
        prepared_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with FaultyUpstream(hidden_size(prepared_dir), "500") as upstream, \
            router(prepared_dir, [upstream.url]) as client:
        response = await client.post("/v1/embeddings", json=BODY, headers={"X-Request-ID": "caller-id-7"})
    assert response.status_code == 502, response.text
    assert response.headers["x-request-id"] == "caller-id-7"
    error = response.json()["error"]
    assert error["request_id"] == "caller-id-7" and "caller-id-7" in error["message"]
    assert error["param"] == "input[0]" and "input[0]" in error["message"]
    assert "CUDA" not in response.text and upstream.url not in response.text and "127.0.0.1" not in response.text
    logged = [r.getMessage() for r in caplog.records if "caller-id-7" in r.getMessage()]
    assert any("CUDA error: an illegal memory access" in line and upstream.url in line for line in logged), logged


async def test_a_healthy_upstream_still_answers(prepared_dir: Path) -> None:
    """The stand-in itself is sound: the faults above are the only reason for those errors."""
    async with FaultyUpstream(hidden_size(prepared_dir), "ok") as upstream, \
            router(prepared_dir, [upstream.url]) as client:
        response = await client.post("/v1/embeddings", json=BODY)
    assert response.status_code == 200, response.text


async def test_a_request_over_the_token_cap_is_a_413_naming_it(prepared_dir: Path) -> None:
    async with FaultyUpstream(hidden_size(prepared_dir), "ok") as upstream, \
            router(prepared_dir, [upstream.url], limits={"max_request_tokens": 100}) as client:
        response = await client.post("/v1/embeddings", json={"input": ["word " * 60] * 3, "task": "retrieval"})
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert "100" in error["message"] and "max_request_tokens" in error["message"]
        assert error["code"] == "too_many_tokens"
        assert upstream.calls == 0  # refused before anything was sent
        assert (await client.post("/v1/embeddings", json=BODY)).status_code == 200


@pytest.mark.vllm
async def test_one_task_down_keeps_the_others_serving(vllm_stack) -> None:
    down = f"http://127.0.0.1:{free_port()}"  # the code deployment is stopped: nothing listens there
    deployments = {**vllm_stack.deployments, "code": vllm_stack.deployments["code"].model_copy(update={"urls": [down]})}
    config = vllm_stack.model_copy(update={
        "deployments": deployments, "router": vllm_stack.router.model_copy(update={"port": free_port()})})
    async with InProcessServer(create_app(config), config.router.port) as server, \
            httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        ready = await client.get("/ready")
        assert ready.status_code == 200, ready.text
        assert ready.json()["tasks"] == {"retrieval": "ready", "text-matching": "ready", "code": "unavailable"}
        assert "code" in ready.json()["message"]
        refused = await client.post("/v1/embeddings", json={"input": ["x"], "task": "code.query"})
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
        for task in ("retrieval.query", "text-matching"):
            served = await client.post("/v1/embeddings", json={"input": ["x"], "task": task})
            assert served.status_code == 200, served.text
