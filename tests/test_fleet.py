"""Three router processes over ONE real vLLM deployment share its budget.

The session's retrieval deployment (demo checkpoint) gets a budget of six long passages and
a tight ``request_timeout_s``; three ``jv4-vllm router`` processes list each other in
``router.peers``. A burst through all three must succeed entirely while vLLM's own gauges
(``vllm:num_requests_running`` + ``vllm:num_requests_waiting``, polled during the burst)
never show more than the budget plus one request. Then one router is killed: the other two
must take its share back (each now admits half the budget) and serve a second burst within
the same bound.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from vllm_stack import free_port, wait_ready, write_config

from jv4_vllm.bench.fleet import passage as passage_of
from jv4_vllm.bench.fleet import router_gauge, run_cell
from jv4_vllm.config import Config
from jv4_vllm.deploy.launch import Child, spawn, stop_children

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

TASK = "retrieval"
ROUTERS = 3
BUDGET_REQUESTS = 6  # divisible by 3 and by 2: every share is a whole number of requests
PASSAGE_TOKENS = 2000
TIMEOUT_S = 10.0  # each call alone takes a fraction of this; calls queued inside vLLM would not
HEALTH_S = 0.5
BURST = 8  # requests per router, all at once
LEAVE_WITHIN_S = 15.0  # a generous multiple of the peer check (HEALTH_S + its 2 s timeout)


@pytest.fixture(scope="module")
def passage(prepared_dir: Path) -> tuple[str, int]:
    """A long passage and its prompt's exact token count."""
    return passage_of(prepared_dir / TASK, PASSAGE_TOKENS)


@pytest.fixture(scope="module")
def fleet(vllm_stack: Config, passage: tuple[str, int],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[str], list[Child], int]]:
    """Three routers listing each other; yields (urls, children, budget in tokens) once each counts three."""
    budget = BUDGET_REQUESTS * passage[1]
    ports = [free_port() for _ in range(ROUTERS)]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    directory = tmp_path_factory.mktemp("fleet")
    children: list[Child] = []
    try:
        for index, port in enumerate(ports):
            config = vllm_stack.model_copy(update={
                "deployments": {TASK: vllm_stack.deployments[TASK]},
                "router": vllm_stack.router.model_copy(update={
                    "port": port, "peers": urls, "api_keys_env": "JV4_TEST_UNSET_KEYS"}),
                "backend": vllm_stack.backend.model_copy(update={
                    "tokens_in_flight_per_replica": budget, "request_timeout_s": TIMEOUT_S,
                    "health_interval_s": HEALTH_S, "max_queue": 64})})
            path = write_config(config, directory / f"router-{index}.yaml")
            children.append(spawn(f"router-{index}", [sys.executable, "-m", "jv4_vllm.cli", "router", "--config",
                                                      str(path)], directory))
        for url, child in zip(urls, children):
            wait_ready(url, child.process)
        for url in urls:
            _until(lambda url=url: _gauge(url, "jv4_fleet_routers") == ROUTERS, LEAVE_WITHIN_S)
        yield urls, children, budget
    finally:
        stop_children(children)


def _gauge(url: str, name: str) -> float | None:
    return router_gauge(httpx.get(f"{url}/metrics", timeout=5).text, name)


def _until(predicate: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _burst(urls: list[str], vllm_url: str, text: str) -> tuple[list[str], int]:
    body = {"input": [text], "task": f"{TASK}.passage", "embedding_type": "base64"}
    _, errors, _, peak = asyncio.run(run_cell(urls, vllm_url, body, BURST * len(urls), BURST * len(urls)))
    return errors, peak


def test_a_burst_through_three_routers_keeps_vllm_within_the_budget(fleet, vllm_stack: Config, passage) -> None:
    urls, _, budget = fleet
    for url in urls:
        assert _gauge(url, "jv4_budget_tokens") == budget
        assert _gauge(url, "jv4_share_tokens") == budget // ROUTERS
    errors, peak = _burst(urls, vllm_stack.deployments[TASK].urls[0], passage[0])
    assert errors == []
    assert 1 <= peak <= BUDGET_REQUESTS + 1, f"vLLM held {peak} calls; the budget is {BUDGET_REQUESTS}"


def test_a_killed_router_hands_its_share_back(fleet, vllm_stack: Config, passage) -> None:
    urls, children, budget = fleet
    children[-1].process.send_signal(signal.SIGKILL)  # no goodbye: the others must notice
    children[-1].process.wait(timeout=10)
    alive = urls[:-1]
    for url in alive:
        _until(lambda url=url: _gauge(url, "jv4_share_tokens") == budget // len(alive), LEAVE_WITHIN_S)
        assert _gauge(url, "jv4_fleet_routers") == len(alive)

    admitted = {url: 0.0 for url in alive}

    async def watch(stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(timeout=5) as http:
            while not stop.is_set():
                for url in alive:
                    text = (await http.get(f"{url}/metrics")).text
                    admitted[url] = max(admitted[url], router_gauge(text, "jv4_admitted_tokens") or 0.0)
                await asyncio.sleep(0.02)

    async def burst() -> tuple[list[str], int]:
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(stop))
        body = {"input": [passage[0]], "task": f"{TASK}.passage", "embedding_type": "base64"}
        try:
            _, errors, _, peak = await run_cell(alive, vllm_stack.deployments[TASK].urls[0], body,
                                                BURST * len(alive), 2 * BURST * len(alive))
        finally:
            stop.set()
            await watcher
        return errors, peak

    errors, peak = asyncio.run(burst())
    assert errors == []
    assert peak <= BUDGET_REQUESTS + 1, f"vLLM held {peak} calls; the budget is {BUDGET_REQUESTS}"
    # Together the two reach the whole budget again: each admitted its new, larger share.
    assert all(value == budget // len(alive) for value in admitted.values()), admitted


def test_the_fleet_benchmark_reports_every_router_count(vllm_stack: Config, demo_source: Path, prepared_dir: Path,
                                                        tmp_path: Path) -> None:
    """A smoke run of ``jv4-vllm bench -- fleet`` on the session's deployment (numbers not judged)."""
    from jv4_vllm.bench import main

    code = main(["fleet", "--source", str(demo_source), "--prepared", str(prepared_dir), "--out", str(tmp_path),
                 "--vllm-url", vllm_stack.deployments[TASK].urls[0], "--routers", "1,2", "--concurrency", "4",
                 "--requests", "6", "--tokens", "512", "--budget-requests", "2", "--timeout", "60",
                 "--label", "smoke"])
    assert code == 0, (tmp_path / "fleet-smoke.md").read_text()
    cells = json.loads((tmp_path / "fleet-smoke.json").read_text())
    assert [(c["routers"], c["shared"]) for c in cells] == [(1, False), (2, True)]
    for cell in cells:
        assert cell["failed"] == 0 and cell["items_per_s"] > 0 and 0 < cell["p50_ms"] <= cell["p99_ms"]
        assert isinstance(cell["peak_vllm_calls"], int)  # short calls may finish between two polls
    assert "| smoke | 2 | yes |" in (tmp_path / "fleet-smoke.md").read_text()
