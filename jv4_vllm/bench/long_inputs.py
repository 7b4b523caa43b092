"""The long-input workload: full-length passages through a router process under load.

Closed loops of 16k-token passages at a few concurrency levels, single- and multi-vector.
For each cell: items/s, failed requests, the router's peak RSS above idle per in-flight
request (sampled with psutil), and ``/health`` latency measured from another thread while
the load runs (p50/p99: the event loop must never stall). It measures any router given its
URL and PID, so two routers (say, two releases) can be compared on one deployment.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import httpx
import numpy as np

__all__ = ["LongCell", "long_passage", "markdown_rows", "measure_long_inputs"]

HEALTH_EVERY_S = 0.02
RSS_EVERY_S = 0.02


@dataclass(frozen=True)
class LongCell:
    mode: str
    concurrency: int
    requests: int
    failed: int
    items_per_s: float
    idle_rss_mb: float
    peak_rss_mb: float
    rss_per_request_mb: float
    health_p50_ms: float
    health_p99_ms: float
    health_max_ms: float
    errors: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def long_passage(tokenizer: Any, tokens: int) -> str:
    """A text of about ``tokens`` tokens for ``tokenizer`` (a tokenizers.Tokenizer)."""
    sentence = ("Full-length documents are embedded in one pass: contracts, manuals, reports and papers, "
                "page after page of them. ")
    per = max(1, len(tokenizer.encode(sentence, add_special_tokens=False).ids))
    text = sentence * (tokens // per + 2)
    ids = tokenizer.encode(text, add_special_tokens=False).ids[:tokens]
    return tokenizer.decode(ids)


class _Sampler(threading.Thread):
    """Polls /health and the router's RSS from its own thread while the load runs."""

    def __init__(self, url: str, pid: int) -> None:
        super().__init__(daemon=True)
        import psutil  # a dev tool: only the benchmark needs it

        self._process = psutil.Process(pid)
        self._url = url
        self.stop = threading.Event()
        self.health_ms: list[float] = []
        self.peak_rss = 0

    def run(self) -> None:
        next_health = 0.0
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                self.peak_rss = max(self.peak_rss, self._rss())
                now = time.perf_counter()
                if now >= next_health:
                    start = time.perf_counter()
                    client.get(f"{self._url}/health")
                    self.health_ms.append((time.perf_counter() - start) * 1000)
                    next_health = time.perf_counter() + HEALTH_EVERY_S
                time.sleep(RSS_EVERY_S)

    def _rss(self) -> int:
        return int(self._process.memory_info().rss)


async def _closed_loop(url: str, body: dict[str, Any], concurrency: int, requests: int) -> tuple[int, list[str]]:
    """``requests`` requests, ``concurrency`` at a time; returns (failed, error messages)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(requests):
        queue.put_nowait(index)
    errors: list[str] = []
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(3600)) as client:
        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                response = await client.post("/v1/embeddings", json=body)
                if response.status_code != 200:
                    errors.append(f"{response.status_code}: {response.text[:200]}")
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(errors), errors


def measure_long_inputs(url: str, pid: int, text: str, *, modes: tuple[str, ...] = ("single", "multi"),
                        concurrency: tuple[int, ...] = (1, 4, 8), rounds: int = 2) -> list[LongCell]:
    """One cell per (mode, concurrency): ``rounds * concurrency`` requests of one passage each."""
    import psutil

    cells = []
    for mode in modes:
        body = {"input": [text], "task": "retrieval.passage", "truncate": True, "embedding_type": "base64",
                "return_multivector": mode == "multi"}
        for level in concurrency:
            idle = psutil.Process(pid).memory_info().rss
            sampler = _Sampler(url, pid)
            sampler.start()
            requests = rounds * level
            started = time.perf_counter()
            failed, errors = asyncio.run(_closed_loop(url, body, level, requests))
            seconds = time.perf_counter() - started
            sampler.stop.set()
            sampler.join()
            health = np.asarray(sampler.health_ms or [float("nan")])
            peak = max(sampler.peak_rss, idle)
            cells.append(LongCell(
                mode=mode, concurrency=level, requests=requests, failed=failed,
                items_per_s=(requests - failed) / seconds, idle_rss_mb=idle / 2**20, peak_rss_mb=peak / 2**20,
                rss_per_request_mb=(peak - idle) / 2**20 / level,
                health_p50_ms=float(np.percentile(health, 50)), health_p99_ms=float(np.percentile(health, 99)),
                health_max_ms=float(health.max()), errors=tuple(errors[:3])))
    return cells


def markdown_rows(cells: list[LongCell], label: str) -> list[str]:
    """Table rows: router, mode, c, items/s, failed, RSS per in-flight request, /health p50/p99/max."""
    return [f"| {label} | {c.mode} | {c.concurrency} | {c.items_per_s:.3f} | {c.failed}/{c.requests} | "
            f"{c.rss_per_request_mb:.1f} | {c.peak_rss_mb:.0f} | {c.health_p50_ms:.1f} | {c.health_p99_ms:.1f} | "
            f"{c.health_max_ms:.0f} |" for c in cells]


def long_main(argv: list[str]) -> int:
    """``jv4-vllm bench -- long-inputs``: start what is missing, measure, write long-inputs.md/json."""
    import argparse
    import json
    from pathlib import Path

    from tokenizers import Tokenizer

    from jv4_vllm.bench.settings import BenchSettings
    from jv4_vllm.bench.stack import Stack, bench_config

    p = argparse.ArgumentParser(prog="jv4-vllm bench -- long-inputs", description=__doc__)
    p.add_argument("--source", type=Path, required=True, help="unmerged checkpoint (a 2048-d demo one is realistic)")
    p.add_argument("--prepared", type=Path, required=True, help="`jv4-vllm prepare` output holding retrieval/")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    p.add_argument("--tokens", type=int, default=16384, help="tokens per passage")
    p.add_argument("--concurrency", default="1,4,8")
    p.add_argument("--modes", default="single,multi")
    p.add_argument("--rounds", type=int, default=2, help="requests per cell = rounds x concurrency")
    p.add_argument("--wire-dtype", default="bfloat16")
    p.add_argument("--vllm-url", default=None, help="a running retrieval deployment (else one is started)")
    p.add_argument("--router-url", default=None, help="measure this running router (needs --router-pid)")
    p.add_argument("--router-pid", type=int, default=None)
    p.add_argument("--label", default="router")
    a = p.parse_args(argv)
    settings = BenchSettings(source=a.source.resolve(), prepared=a.prepared.resolve(), out=a.out.resolve(),
                             vllm_url=a.vllm_url, max_model_len=a.tokens + 64)
    text = long_passage(Tokenizer.from_file(str(settings.prepared / "retrieval" / "tokenizer.json")), a.tokens)
    stack = Stack(settings.out / "logs")
    try:
        url, pid = a.router_url, a.router_pid
        if url is None:
            config = bench_config(settings)
            config = config.model_copy(update={"backend": config.backend.model_copy(update={
                "wire_dtype": a.wire_dtype,
                "tokens_in_flight_per_replica": type(config.backend)().tokens_in_flight_per_replica})})
            if settings.vllm_url is None:
                stack.start_vllm(config, "retrieval")
            child, url = stack.start_router(config, "bench-long-router")
            pid = child.process.pid
        cells = measure_long_inputs(url, int(pid), text, modes=tuple(a.modes.split(",")),
                                    concurrency=tuple(int(c) for c in a.concurrency.split(",")), rounds=a.rounds)
    finally:
        stack.close()
    settings.out.mkdir(parents=True, exist_ok=True)
    (settings.out / f"long-inputs-{a.label}.json").write_text(json.dumps([c.as_dict() for c in cells], indent=2))
    header = ["| router | mode | c | items/s | failed | router MB per in-flight request | router peak MB | "
              "/health p50 ms | /health p99 ms | /health max ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    table = "\n".join(header + markdown_rows(cells, a.label))
    (settings.out / f"long-inputs-{a.label}.md").write_text(table + "\n")
    print(table)
    for cell in cells:
        for error in cell.errors:
            print(f"error ({cell.mode}, c={cell.concurrency}): {error}")
    return 1 if any(c.failed for c in cells) else 0
