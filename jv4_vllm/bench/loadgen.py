"""Closed-loop load: ``concurrency`` workers, each sending its next request as soon as the last returns.

Workers stop starting requests after ``duration_s``; requests in flight are drained and
counted, so the elapsed time always covers whole requests (a slow backend at high
concurrency makes a cell last longer than ``duration_s``, never report a partial batch).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from jv4_vllm.bench.paths import Outcome

if TYPE_CHECKING:
    import psutil

__all__ = ["CpuMeter", "Measurement", "closed_loop", "percentile_ms"]


@dataclass(slots=True)
class Measurement:
    requests: int = 0
    items: int = 0
    tokens: int = 0
    wire_bytes: int = 0
    errors: int = 0
    first_error: str | None = None
    seconds: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)  # process name -> CPU seconds used in the cell

    def add(self, outcome: Outcome, latency_s: float) -> None:
        self.requests += 1
        self.items += outcome.items
        self.tokens += outcome.tokens
        self.wire_bytes += outcome.wire_bytes
        self.latencies_s.append(latency_s)

    def fail(self, error: BaseException) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = f"{type(error).__name__}: {error}"[:300]


def percentile_ms(latencies_s: Sequence[float], q: float) -> float | None:
    return float(np.percentile(latencies_s, q) * 1000) if latencies_s else None


def _psutil() -> ModuleType:
    """psutil is a development tool (the ``dev`` extra): imported only when a meter is made."""
    try:
        import psutil
    except ImportError as exc:
        raise ImportError("the benchmark measures CPU time with psutil: install jv4_vllm[dev]") from exc
    return psutil


class CpuMeter:
    """CPU seconds (user + system, all threads) of named processes and of the whole machine.

    ``others`` in a delta is the machine's busy time (plus time stolen by the hypervisor) not
    spent in this process or a watched one: other tenants of a shared machine, which make a
    cell's numbers less trustworthy.
    """

    def __init__(self) -> None:
        self._ps = _psutil()
        self._processes: dict[str, tuple[psutil.Process, bool]] = {"bench": (self._ps.Process(), False)}

    def watch(self, name: str, pid: int) -> None:
        """Watch a process and its descendants (vLLM's API server runs its engine in a child)."""
        self._processes[name] = (self._ps.Process(pid), True)

    def _seconds(self, root: psutil.Process, tree: bool) -> float:
        total = 0.0
        for process in [root, *root.children(recursive=True)] if tree else [root]:
            try:
                times = process.cpu_times()
            except self._ps.Error:
                continue
            total += times.user + times.system
        return total

    def read(self) -> dict[str, float]:
        out = {}
        for name, (root, tree) in self._processes.items():
            try:
                out[name] = self._seconds(root, tree)
            except self._ps.Error:
                continue
        t = self._ps.cpu_times()
        out["machine"] = sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))
        return out

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        used = {name: after[name] - before[name] for name in after if name in before}
        mine = sum(v for name, v in used.items() if name != "machine")
        used["others"] = max(0.0, used.get("machine", 0.0) - mine)
        return used


async def closed_loop(send: Callable[[Any], Awaitable[Outcome]], requests: Sequence[Any], concurrency: int,
                      duration_s: float, meter: CpuMeter | None = None) -> Measurement:
    """Run ``concurrency`` workers over ``requests`` (cycled; worker k starts at k) for ``duration_s``."""
    result = Measurement()
    cpu_before = meter.read() if meter else {}
    start = time.perf_counter()
    deadline = start + duration_s

    async def worker(k: int) -> None:
        position = k
        while time.perf_counter() < deadline:
            request = requests[position % len(requests)]
            position += concurrency
            began = time.perf_counter()
            try:
                outcome = await send(request)
            except Exception as error:  # a failing request is reported, not fatal
                result.fail(error)
                continue
            result.add(outcome, time.perf_counter() - began)

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    result.seconds = time.perf_counter() - start
    if meter:
        result.cpu_s = meter.delta(cpu_before, meter.read())
    return result
