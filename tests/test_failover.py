"""Scale-out on real vLLM: a replica killed mid-stream, a task with no replica left, a replica coming back."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from vllm_stack import InProcessServer, free_port, wait_healthy

from jv4_vllm.deploy.launch import start_deployment, stop_children
from jv4_vllm.router import create_app

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

STREAM = 80
CONCURRENCY = 4
KILL_AFTER = 15


def _config_with(stack, code_urls: list[str]):
    deployments = {**stack.deployments, "code": stack.deployments["code"].model_copy(update={"urls": code_urls})}
    return stack.model_copy(update={"deployments": deployments})


async def _embed(client: httpx.AsyncClient, task: str, text: str) -> tuple[int, float, httpx.Response]:
    started = time.perf_counter()
    response = await client.post("/v1/embeddings", json={"input": [text], "task": task}, timeout=120)
    return response.status_code, time.perf_counter() - started, response


async def _served_requests(url: str) -> float:
    """Requests a vLLM replica has finished, from its own Prometheus metrics."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{url}/metrics")).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total"))


async def _wait_until(predicate, timeout_s: float = 30.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.2)


async def test_replica_failover_and_recovery(vllm_stack, reference, parity_report):
    port = free_port()
    extra_url = f"http://127.0.0.1:{port}"
    extra = start_deployment(vllm_stack, "code", port=port, name="vllm-code-extra")
    children = [extra]
    try:
        await asyncio.to_thread(wait_healthy, [extra_url], children)
        shared_url = vllm_stack.deployments["code"].urls[0]
        both = create_app(_config_with(vllm_stack, [shared_url, extra_url]))
        only_extra = create_app(_config_with(vllm_stack, [extra_url]))
        async with InProcessServer(both, free_port()) as router, InProcessServer(only_extra, free_port()) as lonely:
            http = httpx.AsyncClient(base_url=router.url)
            lonely_http = httpx.AsyncClient(base_url=lonely.url)
            want = reference.encode_text(["failover probe"], task="code", prompt_name="passage")[0]

            # 1. a stream of requests; the extra replica is killed part-way through
            gate = asyncio.Semaphore(CONCURRENCY)
            done = 0
            killed_at = None

            async def one(i: int):
                nonlocal done, killed_at
                async with gate:
                    result = await _embed(http, "code.passage", "failover probe")
                done += 1
                if done == KILL_AFTER and killed_at is None:
                    killed_at = time.perf_counter()
                    os.killpg(extra.process.pid, signal.SIGKILL)
                return result

            results = await asyncio.gather(*(one(i) for i in range(STREAM)))
            statuses = [status for status, _, _ in results]
            latencies = [seconds for _, seconds, _ in results]
            assert killed_at is not None and extra.process.wait(timeout=10) is not None
            assert statuses.count(200) == STREAM, statuses
            for _, _, response in results:
                got = np.array(response.json()["data"][0]["embedding"])
                assert got @ want / np.linalg.norm(got) / np.linalg.norm(want) >= 0.9999
            print(f"failover: {STREAM} sent, {STREAM - statuses.count(200)} failed, "
                  f"max latency {max(latencies) * 1000:.0f} ms, p50 {np.median(latencies) * 1000:.0f} ms")

            # 2. every replica of a task down: 503 + Retry-After for it, other tasks keep working and
            #    the router stays ready (per-task readiness), naming the task that is down
            async def lonely_code_down() -> bool:
                ready = await lonely_http.get("/ready")
                return ready.status_code == 200 and ready.json()["tasks"]["code"] == "unavailable"
            await _wait_until(lonely_code_down)
            status, _, response = await _embed(lonely_http, "code.query", "anyone there?")
            assert status == 503 and float(response.headers["retry-after"]) > 0
            assert response.json()["error"]["code"] == "no_healthy_backend"
            status, _, _ = await _embed(lonely_http, "retrieval.query", "still working")
            assert status == 200

            # 3. the replica comes back and is used again
            restarted = start_deployment(vllm_stack, "code", port=port, name="vllm-code-extra-2")
            children.append(restarted)
            await asyncio.to_thread(wait_healthy, [extra_url], [restarted])

            async def lonely_ready() -> bool:
                ready = await lonely_http.get("/ready")
                return ready.status_code == 200 and ready.json()["tasks"]["code"] == "ready"
            await _wait_until(lonely_ready)
            status, _, _ = await _embed(lonely_http, "code.query", "welcome back")
            assert status == 200

            async def both_see_it() -> bool:  # the two-replica router probes on its own schedule
                text = (await http.get("/metrics")).text
                return any(sample.labels.get("replica") == extra_url and sample.value == 1.0
                           for family in text_string_to_metric_families(text)
                           for sample in family.samples if sample.name == "jv4_backend_healthy")
            await _wait_until(both_see_it)
            before = await _served_requests(extra_url)
            back = await asyncio.gather(*(_embed(http, "code.query", f"again {i}") for i in range(20)))
            assert all(status == 200 for status, _, _ in back)
            assert await _served_requests(extra_url) > before
            await http.aclose()
            await lonely_http.aclose()
    finally:
        stop_children(children)
