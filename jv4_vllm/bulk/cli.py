"""The flags of ``jv4-vllm run-batch`` and ``jv4-vllm embed`` and the commands behind them."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from typing import Any

from jv4_vllm.bulk.job import JobSettings
from jv4_vllm.bulk.pacing import PacingSettings
from jv4_vllm.bulk.shard import parse_shard
from jv4_vllm.bulk.transport import RetrySettings, Transport
from jv4_vllm.cli_twins import add_flag

__all__ = ["add_embed_flags", "add_job_flags", "embed_command", "run_batch_command"]


def add_job_flags(p: argparse.ArgumentParser, command: str) -> None:
    """The flags both commands share."""
    add_flag(p, command, "--input", "-i", required=True, help="input file (`-` reads stdin)")
    add_flag(p, command, "--output", "-o", required=True,
             help="output file; rerun with the same one to resume")
    target = p.add_mutually_exclusive_group()
    add_flag(target, command, "--url", default=None, help="router URL")
    add_flag(target, command, "--config", default=None,
             help="YAML config: run on the in-process engine, straight to the deployments")
    add_flag(p, command, "--api-key", default=None, help="router API key")
    add_flag(p, command, "--shard", default=None,
             help="I/N: take a stable 1/N of the input (`job/N`: I from JOB_COMPLETION_INDEX)")
    add_flag(p, command, "--max-concurrency", type=int, default=64,
             help="requests in flight at most (the job adapts below it)")
    add_flag(p, command, "--initial-concurrency", type=int, default=4, help="requests in flight at the start")
    add_flag(p, command, "--give-up-after", type=float, default=None,
             help="seconds a request is retried through overload and outages (default: until it succeeds)")
    add_flag(p, command, "--timeout", type=float, default=600.0, help="seconds one request may take")
    add_flag(p, command, "--quiet", action="store_true", help="no progress bar; one summary line at the end")


def add_embed_flags(p: argparse.ArgumentParser, command: str) -> None:
    add_flag(p, command, "--task", required=True,
             help="retrieval.query, retrieval.passage, text-matching, code.query, ...")
    add_flag(p, command, "--multivector", action="store_true",
             help="one 128-d row per token (plus the dense vector)")
    add_flag(p, command, "--dimensions", type=int, default=None, help="Matryoshka size of the dense vectors")
    add_flag(p, command, "--batch-size", type=int, default=32, help="texts per request")
    add_flag(p, command, "--image-batch-size", type=int, default=8, help="images (and PDF pages) per request")
    add_flag(p, command, "--row-group-size", type=int, default=256,
             help="rows per Parquet row group (the unit of resume)")
    add_flag(p, command, "--qdrant", default=None,
             help="also upsert into Qdrant: a URL, or a directory for its local mode")
    add_flag(p, command, "--collection", default=None, help="Qdrant collection (created when missing)")
    add_flag(p, command, "--model", default="jina-embeddings-v4", help="model name sent to the service")


def _settings(args: argparse.Namespace) -> JobSettings:
    if not args.url and not args.config:
        raise ValueError("give the router's --url, or --config to run on the in-process engine")
    if args.max_concurrency < 1 or args.initial_concurrency < 1:
        raise ValueError("--max-concurrency and --initial-concurrency must be at least 1")
    pacing = PacingSettings(initial=min(args.initial_concurrency, args.max_concurrency),
                            maximum=args.max_concurrency)
    return JobSettings(shard=parse_shard(args.shard), pacing=pacing,
                       retry=RetrySettings(give_up_after_s=args.give_up_after), quiet=args.quiet)


async def _transport(args: argparse.Namespace) -> Transport:
    if args.url:  # a URL given with a config (from JV4_CONFIG, say) wins: it is the more specific
        return Transport.router(args.url, api_key=args.api_key, timeout_s=args.timeout)
    return await Transport.in_process(args.config, timeout_s=args.timeout)


def _run(job: Callable[[Transport], Any], args: argparse.Namespace) -> int:
    async def main() -> None:
        transport = await _transport(args)
        try:
            await job(transport)
        finally:
            await transport.aclose()

    asyncio.run(main())
    return 0


def run_batch_command(args: argparse.Namespace) -> int:
    from jv4_vllm.bulk.run_batch import run_batch

    settings = _settings(args)
    return _run(lambda transport: run_batch(args.input, args.output, transport, settings), args)


def embed_command(args: argparse.Namespace) -> int:
    from jv4_vllm.bulk.embed import EmbedSettings, embed

    if args.qdrant and not args.collection:
        raise ValueError("--qdrant needs --collection")
    options = EmbedSettings(task=args.task, multivector=args.multivector, dimensions=args.dimensions,
                            batch_size=args.batch_size, image_batch_size=args.image_batch_size,
                            row_group_size=args.row_group_size, qdrant=args.qdrant, collection=args.collection,
                            model=args.model)
    settings = _settings(args)
    return _run(lambda transport: embed(args.input, args.output, transport, settings, options), args)
