"""``jv4-vllm bench``: flags -> :class:`BenchSettings`, one run, the report files."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from jv4_vllm.bench.settings import ALL_PATHS, MODES, WORKLOADS, BenchSettings

__all__ = ["main", "parse_args"]

log = logging.getLogger("jv4_vllm.bench")


def _names(allowed: Sequence[str]):  # noqa: ANN202 - an argparse type
    def parse(value: str) -> tuple[str, ...]:
        names = tuple(v.strip() for v in value.split(",") if v.strip())
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"{value!r}: choose from {','.join(allowed)}")
        return names
    return parse


def _ints(value: str) -> tuple[int, ...]:
    try:
        levels = tuple(sorted({int(v) for v in value.split(",") if v.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of integers") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be positive integers")
    return levels


def parse_args(argv: Sequence[str]) -> BenchSettings:
    d = BenchSettings(source=Path("."), prepared=Path("."))  # defaults
    p = argparse.ArgumentParser(
        prog="jv4-vllm bench",
        description="Measure direct vLLM /pooling (JSON floats, fp16 bytes), the in-process engine, the router "
                    "and the reference encoder against ONE vLLM deployment; write JSON, markdown and a plot.")
    p.add_argument("--source", type=Path, required=True, help="unmerged checkpoint (the reference encoder reads it)")
    p.add_argument("--prepared", type=Path, required=True, help="`jv4-vllm prepare` output holding <task>/")
    p.add_argument("--out", type=Path, default=d.out, help="where results.json/.md, throughput.png go")
    p.add_argument("--task", default=d.task)
    p.add_argument("--vllm-url", default=None, help="use this running deployment instead of starting one")
    p.add_argument("--dtype", default=d.dtype, help="dtype of the vLLM server started here")
    p.add_argument("--max-model-len", type=int, default=d.max_model_len)
    p.add_argument("--paths", type=_names(ALL_PATHS), default=d.paths, help=",".join(ALL_PATHS))
    p.add_argument("--workloads", type=_names(WORKLOADS), default=d.workloads, help=",".join(WORKLOADS))
    p.add_argument("--modes", type=_names(MODES), default=d.modes, help=",".join(MODES))
    p.add_argument("--concurrency", type=_ints, default=d.concurrency, help="e.g. 1,8,32")
    p.add_argument("--duration", type=float, default=d.duration_s, help="seconds of load per cell")
    p.add_argument("--warmup-requests", type=int, default=d.warmup_requests)
    p.add_argument("--batch", type=int, default=d.batch, help="items per request")
    p.add_argument("--reference-batch", type=int, default=d.reference_batch)
    p.add_argument("--query-tokens", type=int, default=d.query_tokens)
    p.add_argument("--passage-tokens", type=int, default=d.passage_tokens)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--pool-size", type=int, default=d.pool_size, help="distinct inputs per workload")
    p.add_argument("--probe-items", type=int, default=d.probe_items, help="items of the cross-path check")
    p.add_argument("--ceiling", type=float, default=d.ceiling_s, help="seconds per router-ceiling run (0: skip)")
    p.add_argument("--ceiling-concurrency", type=int, default=d.ceiling_concurrency)
    p.add_argument("--profile", type=float, default=d.profile_s,
                   help="seconds of pyinstrument profile of the router under replay load (0: skip)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--vllm-arg", action="append", default=[], help="extra vLLM server argument (repeatable)")
    a = p.parse_args(list(argv))
    return BenchSettings(
        source=a.source.resolve(), prepared=a.prepared.resolve(), out=a.out.resolve(), task=a.task,
        vllm_url=a.vllm_url, dtype=a.dtype, max_model_len=a.max_model_len, paths=a.paths, workloads=a.workloads,
        modes=a.modes, concurrency=a.concurrency, duration_s=a.duration, warmup_requests=a.warmup_requests,
        batch=a.batch, reference_batch=a.reference_batch, query_tokens=a.query_tokens, passage_tokens=a.passage_tokens,
        image_size=a.image_size, pool_size=a.pool_size, probe_items=a.probe_items, ceiling_s=a.ceiling,
        ceiling_concurrency=a.ceiling_concurrency, profile_s=a.profile, seed=a.seed,
        extra_vllm_args=tuple(a.vllm_arg))


def _stop_on_sigterm(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)  # unwinds through every `finally` that stops children


def main(argv: list[str]) -> int:
    """Run the benchmark; print the summary; 0 when every cell ran without errors.

    ``long-inputs`` as the first argument runs the long-input workload instead
    (:mod:`jv4_vllm.bench.long_inputs`), ``fleet`` the fleet workload (:mod:`jv4_vllm.bench.fleet`), ``bulk`` the bulk
    jobs' (:mod:`jv4_vllm.bench.bulk`), ``pooling`` only the token-pooling row against a running
    router (:mod:`jv4_vllm.bench.pooling`)."""
    if argv and argv[0] == "long-inputs":
        from jv4_vllm.bench.long_inputs import long_main
        return long_main(argv[1:])
    if argv and argv[0] == "bulk":
        from jv4_vllm.bench.bulk import bulk_main
        return bulk_main(argv[1:])
    if argv and argv[0] == "fleet":
        from jv4_vllm.bench.fleet import fleet_main
        previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)  # its routers are stopped on the way out
        try:
            return fleet_main(argv[1:])
        finally:
            signal.signal(signal.SIGTERM, previous)
    if argv and argv[0] == "pooling":
        from jv4_vllm.bench.pooling import pooling_main
        return pooling_main(argv[1:])
    settings = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore"):  # one line per request would cost the load generator CPU
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from jv4_vllm.bench.report import build_report, markdown, write_outputs
    from jv4_vllm.bench.run import run_bench

    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        import uvloop
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            result = runner.run(run_bench(settings))
    finally:
        signal.signal(signal.SIGTERM, previous)
    report = build_report(settings, result)
    files = write_outputs(report, result, settings.out)
    print(markdown(report))
    for kind, path in files.items():
        print(f"{kind}: {path}")
    failed = [r for r in report["results"] if r["errors"]]
    for row in failed:
        print(f"errors: {row['path']} {row['workload']} {row['mode']} c={row['concurrency']}: "
              f"{row['errors']} ({row['first_error']})", file=sys.stderr)
    return 1 if failed else 0
