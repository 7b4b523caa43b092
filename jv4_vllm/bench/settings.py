"""What one benchmark run measures, and for how long."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ALL_PATHS", "DIRECT_PATHS", "MODES", "WORKLOADS", "BenchSettings"]

DIRECT_PATHS = ("vllm-json", "vllm-bytes")
ALL_PATHS = (*DIRECT_PATHS, "engine", "router", "reference")
WORKLOADS = ("query", "passage", "image")
MODES = ("single", "multi")


@dataclass(frozen=True)
class BenchSettings:
    """Everything a run needs; every field has a command-line flag (see ``jv4-vllm bench --help``)."""

    source: Path  # unmerged checkpoint: the reference encoder reads it
    prepared: Path  # prepare output holding <task>/
    out: Path = Path("bench-results")
    task: str = "retrieval"
    vllm_url: str | None = None  # use a running deployment instead of starting one
    dtype: str = "float32"
    max_model_len: int = 1024
    paths: tuple[str, ...] = ALL_PATHS
    workloads: tuple[str, ...] = WORKLOADS
    modes: tuple[str, ...] = MODES
    concurrency: tuple[int, ...] = (1, 8, 32)
    duration_s: float = 2.0  # closed-loop time per cell; in-flight requests are drained and counted
    warmup_requests: int = 2
    batch: int = 1  # items per request (the reference always runs batches of reference_batch)
    reference_batch: int = 8
    query_tokens: int = 16
    passage_tokens: int = 256
    image_size: int = 448
    pool_size: int = 32  # distinct texts/images cycled through per workload
    probe_items: int = 2  # items every path encodes for the cross-path equality check
    ceiling_s: float = 4.0  # router ceiling against the replay upstream; 0 skips it
    ceiling_concurrency: int = 32
    profile_s: float = 0.0  # profile the router under replay load for this long; 0 skips it
    seed: int = 0
    extra_vllm_args: tuple[str, ...] = field(default_factory=tuple)

    @property
    def max_concurrency(self) -> int:
        return max((*self.concurrency, self.ceiling_concurrency))
