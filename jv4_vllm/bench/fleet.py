"""The fleet workload: 1 router and N routers over the same ONE vLLM deployment, long passages.

The same total concurrency is spread round-robin over the routers, each request one long
passage, the same number of requests per cell. The task's budget is set to admit a few such
requests (``--budget-requests``) with a tight ``request_timeout_s``, the setting in which
routers that each admit a full budget overload vLLM. For each cell: aggregate items/s,
failed requests, p50/p99 latency, and the peak number of calls vLLM held at once, read from
vLLM's own gauges (``vllm:num_requests_running`` + ``vllm:num_requests_waiting``) polled
while the load runs. ``--no-peers`` leaves ``router.peers`` unset (routers unaware of each
other: how a fleet behaved before the shared budget, and what an old release can run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["FleetCell", "fleet_main", "vllm_calls"]

VLLM_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting")
POLL_S = 0.05
PEERS_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class FleetCell:
    routers: int
    shared: bool  # router.peers set: the routers share the budget
    concurrency: int
    requests: int
    failed: int
    budget_requests: int
    items_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    peak_vllm_calls: int
    seconds: float
    errors: tuple[str, ...]


def vllm_calls(metrics_text: str) -> int:
    """Calls vLLM holds (running + waiting) according to its own gauges, over every model and engine."""
    total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name in VLLM_GAUGES:
                total += sample.value
    return int(total)


def router_gauge(metrics_text: str, name: str) -> float | None:
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    return None


async def _peak_calls(http: httpx.AsyncClient, vllm_url: str, stop: asyncio.Event) -> int:
    peak = 0
    while not stop.is_set():
        try:
            peak = max(peak, vllm_calls((await http.get(f"{vllm_url}/metrics")).text))
        except httpx.HTTPError:
            pass
        try:
            await asyncio.wait_for(stop.wait(), POLL_S)
        except TimeoutError:
            pass
    return peak


async def run_cell(urls: list[str], vllm_url: str, body: dict[str, Any], concurrency: int, requests: int,
                   ) -> tuple[list[float], list[str], float, int]:
    """``requests`` requests, ``concurrency`` at a time, worker k through router k mod len(urls).

    Returns (latencies of the successes, error messages, seconds, peak vLLM calls)."""
    latencies: list[float] = []
    errors: list[str] = []
    left = requests
    stop = asyncio.Event()
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600)) as http:
        sampler = asyncio.create_task(_peak_calls(http, vllm_url, stop))

        async def worker(k: int) -> None:
            nonlocal left
            url = f"{urls[k % len(urls)]}/v1/embeddings"
            while left > 0:
                left -= 1
                began = time.perf_counter()
                try:
                    response = await http.post(url, json=body)
                except httpx.HTTPError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - began)
                else:
                    errors.append(f"{response.status_code}: {response.text[:200]}")

        start = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        seconds = time.perf_counter() - start
        stop.set()
        peak = await sampler
    return latencies, errors, seconds, peak


def _percentile(latencies: list[float], q: float) -> float | None:
    return float(np.percentile(latencies, q) * 1000) if latencies else None


def wait_for_peers(urls: list[str], timeout_s: float = PEERS_TIMEOUT_S) -> None:
    """Until every router counts all of them (``jv4_fleet_routers``): started at once, they meet later."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=5) as http:
        for url in urls:
            while router_gauge(http.get(f"{url}/metrics").text, "jv4_fleet_routers") != len(urls):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{url} did not find its {len(urls) - 1} peers in {timeout_s:g} s")
                time.sleep(0.2)


def passage(task_dir: Path, tokens: int) -> tuple[str, int]:
    """A passage whose full prompt has at most ``tokens`` tokens, and that prompt's exact count
    (the budget is set in whole such prompts)."""
    from tokenizers import Tokenizer

    from jv4_vllm.bench.long_inputs import long_passage
    from jv4_vllm.core.prompts import PromptBuilder
    from jv4_vllm.core.spec import load_task_spec

    prompts = PromptBuilder(load_task_spec(task_dir))
    tokenizer = Tokenizer.from_file(str(task_dir / "tokenizer.json"))
    target = tokens
    while True:
        text = long_passage(tokenizer, target)
        count = len(prompts.tokenize_texts([text], "passage")[0])
        if count <= tokens:
            return text, count
        target -= count - tokens


def markdown(cells: list[FleetCell], label: str) -> str:
    head = ("| release | routers | shared budget | c | requests | failed | items/s | p50 ms | p99 ms | "
            "peak vLLM calls (budget) |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        p50 = f"{c.p50_ms:.0f}" if c.p50_ms is not None else "-"
        p99 = f"{c.p99_ms:.0f}" if c.p99_ms is not None else "-"
        lines.append(f"| {label} | {c.routers} | {'yes' if c.shared else 'no'} | {c.concurrency} | {c.requests} | "
                     f"{c.failed} | {c.items_per_s:.3f} | {p50} | {p99} | {c.peak_vllm_calls} ({c.budget_requests}) |")
    if len(cells) > 1 and cells[0].items_per_s:
        lines.append("")
        lines += [f"{c.routers} routers vs {cells[0].routers}: {c.items_per_s / cells[0].items_per_s:.2f}x items/s"
                  for c in cells[1:]]
    return "\n".join(lines) + "\n"


def fleet_main(argv: list[str]) -> int:
    """``jv4-vllm bench -- fleet``: start what is missing, measure each router count, write fleet-<label>.md/json."""
    from jv4_vllm.bench.settings import BenchSettings
    from jv4_vllm.bench.stack import Stack, bench_config
    from jv4_vllm.deploy.launch import free_port

    p = argparse.ArgumentParser(prog="jv4-vllm bench -- fleet", description=__doc__)
    p.add_argument("--source", type=Path, required=True, help="unmerged checkpoint (a 2048-d demo one is realistic)")
    p.add_argument("--prepared", type=Path, required=True, help="`jv4-vllm prepare` output holding retrieval/")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    p.add_argument("--routers", default="1,3", help="router counts to measure, e.g. 1,3")
    p.add_argument("--concurrency", type=int, default=9, help="total concurrency, spread over the routers")
    p.add_argument("--requests", type=int, default=27, help="requests per cell")
    p.add_argument("--tokens", type=int, default=4096, help="prompt tokens per request (at most max_model_len)")
    p.add_argument("--budget-requests", type=int, default=3, help="the task's budget, in such requests")
    p.add_argument("--timeout", type=float, default=10.0, help="backend.request_timeout_s of the routers")
    p.add_argument("--wire-dtype", default="bfloat16")
    p.add_argument("--no-peers", action="store_true", help="leave router.peers unset (no shared budget)")
    p.add_argument("--vllm-url", default=None, help="a running retrieval deployment (else one is started)")
    p.add_argument("--label", default="fleet")
    a = p.parse_args(argv)
    counts = [int(c) for c in a.routers.split(",") if c.strip()]
    settings = BenchSettings(source=a.source.resolve(), prepared=a.prepared.resolve(), out=a.out.resolve(),
                             vllm_url=a.vllm_url, max_model_len=a.tokens)
    text, prompt_tokens = passage(settings.prepared / "retrieval", a.tokens)
    body = {"input": [text], "task": "retrieval.passage", "embedding_type": "base64"}
    stack = Stack(settings.out / "logs")
    cells: list[FleetCell] = []
    try:
        base = bench_config(settings)
        vllm_url = base.deployments["retrieval"].urls[0]
        if settings.vllm_url is None:
            stack.start_vllm(base, "retrieval")
        backend = base.backend.model_copy(update={
            "wire_dtype": a.wire_dtype, "tokens_in_flight_per_replica": a.budget_requests * prompt_tokens,
            "request_timeout_s": a.timeout, "max_queue": a.requests})
        for count in counts:
            ports = [free_port() for _ in range(count)]
            urls = [f"http://127.0.0.1:{port}" for port in ports]
            shared = not a.no_peers and count > 1
            routers = []
            for index, port in enumerate(ports):
                settings_of = base.router.model_copy(update={"port": port, **({"peers": urls} if shared else {})})
                config = base.model_copy(update={"router": settings_of, "backend": backend})
                routers.append(stack.start_router(config, f"bench-fleet-{count}-{index}")[0])
            if shared:
                wait_for_peers(urls)
            latencies, errors, seconds, peak = asyncio.run(
                run_cell(urls, vllm_url, body, a.concurrency, a.requests))
            cells.append(FleetCell(
                routers=count, shared=shared, concurrency=a.concurrency, requests=a.requests, failed=len(errors),
                budget_requests=a.budget_requests, items_per_s=len(latencies) / seconds,
                p50_ms=_percentile(latencies, 50), p99_ms=_percentile(latencies, 99), peak_vllm_calls=peak,
                seconds=seconds, errors=tuple(errors[:3])))
            for router in routers:
                stack.stop(router)
    finally:
        stack.close()
    settings.out.mkdir(parents=True, exist_ok=True)
    (settings.out / f"fleet-{a.label}.json").write_text(json.dumps([asdict(c) for c in cells], indent=2))
    table = markdown(cells, a.label)
    (settings.out / f"fleet-{a.label}.md").write_text(table)
    print(table)
    for cell in cells:
        for error in cell.errors:
            print(f"error ({cell.routers} routers): {error}")
    return 1 if any(c.failed for c in cells) else 0
