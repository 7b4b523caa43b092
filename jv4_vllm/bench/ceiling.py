"""The router's own cost, without vLLM: router processes in front of replay upstreams.

A replay answers every ``/pooling`` call with one recorded vLLM ``bytes`` response, as
fast as it can, so what limits throughput is the router: HTTP in, tokenising, the
upstream call, decoding and pooling the hidden states, HTTP out. Dividing by the
router's CPU seconds gives its capacity per core, whatever else shares the machine.
With a recorded short query, the router's added latency at concurrency 1 is measured
against the replay alone. Optionally the passage load runs once more with the router
under pyinstrument.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from jv4_vllm.config import Config
from jv4_vllm.core.pooler_contract import POOLING_PATH
from jv4_vllm.core.prompts import PromptBuilder
from jv4_vllm.core.spec import TaskSpec
from jv4_vllm.bench.loadgen import CpuMeter, Measurement, closed_loop, percentile_ms
from jv4_vllm.bench.paths import RouterPath, VllmPath, json_post
from jv4_vllm.bench.settings import BenchSettings
from jv4_vllm.bench.stack import Stack, bench_config
from jv4_vllm.bench.workloads import Workload

__all__ = ["Recording", "measure_ceiling", "record_response"]

log = logging.getLogger(__name__)
MB = 1e6
# OpenBLAS reads this once, at load: an environment that sets it pins every numpy process to one kernel.
PINNED_KERNEL = "OPENBLAS_CORETYPE"


@dataclass(frozen=True)
class Recording:
    body_file: Path
    metadata_file: Path
    body_bytes: int
    tokens: int


async def record_response(http: httpx.AsyncClient, vllm_url: str, body: bytes, folder: Path, name: str) -> Recording:
    """One real vLLM ``bytes`` answer for one input, kept for a replay upstream."""
    response = await json_post(http, vllm_url.rstrip("/") + POOLING_PATH, body)
    metadata = response.headers["metadata"]
    folder.mkdir(parents=True, exist_ok=True)
    body_file, metadata_file = folder / f"replay-{name}.bin", folder / f"replay-{name}.json"
    body_file.write_bytes(response.content)
    metadata_file.write_text(metadata, encoding="utf-8")
    tokens = int(json.loads(metadata).get("usage", {}).get("prompt_tokens", 0))
    return Recording(body_file, metadata_file, len(response.content), tokens)


def _summary(m: Measurement, recording: Recording, process: str) -> dict[str, Any]:
    cpu = m.cpu_s.get(process)
    hidden = m.items * recording.body_bytes
    tokens = m.items * recording.tokens
    return {
        "items": m.items,
        "errors": m.errors,
        "first_error": m.first_error,
        "seconds": m.seconds,
        "items_per_s": m.items / m.seconds,
        "hidden_mb_per_s": hidden / MB / m.seconds,
        "tokens_per_s": tokens / m.seconds,
        "p50_ms": percentile_ms(m.latencies_s, 50),
        "p95_ms": percentile_ms(m.latencies_s, 95),
        "cpu_s": cpu,
        "cpu_cores_used": cpu / m.seconds if cpu is not None else None,
        "hidden_mb_per_cpu_s": hidden / MB / cpu if cpu else None,
        "tokens_per_cpu_s": tokens / cpu if cpu else None,
        "cpu_ms_per_item": 1000 * cpu / m.items if cpu and m.items else None,
    }


class _Ceiling:
    def __init__(self, settings: BenchSettings, stack: Stack, http: httpx.AsyncClient, spec: TaskSpec,
                 prompts: PromptBuilder) -> None:
        self.settings, self.stack, self.http = settings, stack, http
        self.spec, self.prompts = spec, prompts

    async def _pair(self, recording: Recording, name: str) -> tuple[CpuMeter, VllmPath, Config, str]:
        """A replay serving ``recording`` and a plain client of it; the config of a router in front of it."""
        meter = CpuMeter()
        replay, url = self.stack.start_replay(recording.body_file, recording.metadata_file, name)
        meter.watch("replay", replay.process.pid)
        direct = VllmPath(f"{name}-direct", url, "replay", self.prompts, self.http, "bytes")
        return meter, direct, bench_config(self.settings, upstream_url=url), url

    def _router(self, config: Config, name: str, meter: CpuMeter | None = None,
                profile_to: Path | None = None, unset_env: tuple[str, ...] = ()) -> tuple[Any, RouterPath]:
        child, url = self.stack.start_router(config, name, profile_to=profile_to, unset_env=unset_env)
        if meter is not None:
            meter.watch("router", child.process.pid)
        return child, RouterPath(url, config.model_name, self.settings.task, self.http)

    async def throughput(self, passages: Workload, recording: Recording) -> dict[str, Any]:
        s = self.settings
        c = s.ceiling_concurrency
        meter, direct, config, _ = await self._pair(recording, "replay-passage")
        out: dict[str, Any] = {"concurrency": c, "body_bytes": recording.body_bytes,
                               "tokens_per_item": recording.tokens}
        requests = [direct.request(passages, "single", [0])]  # the recorded item (see latency)
        log.info("ceiling: replay alone, passages, c=%d", c)
        out["replay_direct"] = _summary(await closed_loop(direct.send, requests, c, s.ceiling_s, meter),
                                        recording, "replay")
        out["router"] = {}
        variants: list[tuple[str, str, tuple[str, ...]]] = [(mode, mode, ()) for mode in s.modes]
        if "multi" in s.modes and PINNED_KERNEL in os.environ:
            # The projection's speed depends on the kernel; show the CPU's own choice beside the pinned one.
            variants.append(("multi, OpenBLAS's own kernel", "multi", (PINNED_KERNEL,)))
        for label, mode, unset in variants:
            router, path = self._router(config, "bench-router-replay", meter, unset_env=unset)
            requests = [path.request(passages, mode, [0])]
            for _ in range(2):  # warm-up
                await path.send(requests[0])
            log.info("ceiling: router + replay, passages, %s, c=%d", label, c)
            out["router"][label] = {
                **_summary(await closed_loop(path.send, requests, c, s.ceiling_s, meter), recording, "router"),
                "blas_kernel": blas_kernel(unset)}
            self.stack.stop(router)
        if s.profile_s > 0:
            profile = s.out / "router-profile.txt"
            log.info("profiling the router under replay load for %.0f s -> %s", s.profile_s, profile)
            router, path = self._router(config, "bench-router-profiled", profile_to=profile)
            requests = [path.request(passages, "single", [0])]
            await closed_loop(path.send, requests, c, s.profile_s)
            self.stack.stop(router, interrupt=True)
            out["profile"] = str(profile)
        return out

    async def latency(self, queries: Workload, recording: Recording) -> dict[str, Any]:
        """Concurrency 1, short queries: the replay alone, then the router in front of it."""
        s = self.settings
        meter, direct, config, _ = await self._pair(recording, "replay-query")
        # The replay answers with the recorded item's rows, so only that item (0) is sent: the engine
        # refuses an answer whose rows do not match the prompt's tokens.
        requests = [direct.request(queries, "single", [0])]
        log.info("ceiling: replay alone, queries, c=1")
        alone = await closed_loop(direct.send, requests, 1, s.ceiling_s, meter)
        router, path = self._router(config, "bench-router-replay-query", meter)
        requests = [path.request(queries, "single", [0])]
        for _ in range(2):
            await path.send(requests[0])
        log.info("ceiling: router + replay, queries, c=1")
        routed = await closed_loop(path.send, requests, 1, s.ceiling_s, meter)
        self.stack.stop(router)
        direct_p50, router_p50 = percentile_ms(alone.latencies_s, 50), percentile_ms(routed.latencies_s, 50)
        return {
            "tokens_per_item": recording.tokens,
            "replay_direct": _summary(alone, recording, "replay"),
            "router": _summary(routed, recording, "router"),
            "added_p50_ms": router_p50 - direct_p50 if router_p50 is not None and direct_p50 is not None else None,
        }


def blas_kernel(unset_env: tuple[str, ...] = ()) -> str | None:
    """The BLAS kernel numpy loads in a process started with this environment less ``unset_env``
    (what a router started the same way multiplies with)."""
    probe = ("import json; from jv4_vllm.router.process import blas_pools; "
             "print(json.dumps([pool.get('architecture') for pool in blas_pools()]))")
    environment = {k: v for k, v in os.environ.items() if k not in unset_env}
    done = subprocess.run([sys.executable, "-c", probe], env=environment, capture_output=True, text=True,
                          timeout=60, check=False)
    try:
        kernels = json.loads(done.stdout)
    except ValueError:
        return None
    return kernels[0] if kernels else None


async def measure_ceiling(settings: BenchSettings, stack: Stack, http: httpx.AsyncClient,
                          workloads: dict[str, Workload], recordings: dict[str, Recording], spec: TaskSpec,
                          prompts: PromptBuilder) -> dict[str, Any]:
    """Passage throughput per router core (and its profile); short-query latency added by the router."""
    ceiling = _Ceiling(settings, stack, http, spec, prompts)
    out: dict[str, Any] = {"seconds": settings.ceiling_s, "hidden_size": spec.hidden_size}
    if "passage" in recordings:
        out["passage"] = await ceiling.throughput(workloads["passage"], recordings["passage"])
    if "query" in recordings:
        out["query"] = await ceiling.latency(workloads["query"], recordings["query"])
    return out
