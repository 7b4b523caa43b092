"""``jv4-vllm run-batch``: an OpenAI batch file through the service, every line answered once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import orjson

from jv4_vllm.bulk.batch_file import (
    BadLine,
    BatchLine,
    answer_line,
    bad_line,
    open_input,
    output_key,
    read_lines,
    refused_line,
    unreachable_line,
)
from jv4_vllm.bulk.job import JobSettings, Sender, check_unique
from jv4_vllm.bulk.jsonl_out import JsonlAppender, repair_jsonl
from jv4_vllm.bulk.keys import KeySet, key_hash
from jv4_vllm.bulk.progress import Progress, prompt_tokens
from jv4_vllm.bulk.transport import Answer, Transport

__all__ = ["run_batch"]


def _key(line: BatchLine | BadLine) -> str:
    return line.custom_id if isinstance(line, BatchLine) else line.key


async def run_batch(input_path: str, output_path: str, transport: Transport, settings: JobSettings) -> str:
    """Answer every line of ``input_path`` that this shard owns and ``output_path`` lacks.

    Returns the closing summary. Lines already in the output (a rerun) are skipped; a cut
    last line left by a kill is dropped first and sent again.
    """
    source = open_input(input_path)
    try:
        return await _run(source, output_path, transport, settings)
    finally:
        if input_path == "-":
            source.unlink(missing_ok=True)


async def _run(source: Path, output_path: str, transport: Transport, settings: JobSettings) -> str:
    check_unique(lambda: ((line.custom_id, line.number) for line in read_lines(source)
                          if isinstance(line, BatchLine)), "custom_id")
    shard = settings.shard
    done = KeySet(repair_jsonl(Path(output_path), output_key)) if output_path != "-" else KeySet()
    mine = skipped = 0
    for line in read_lines(source):
        h = key_hash(_key(line))
        if shard.owns(h):
            mine += 1
            skipped += h in done
    progress = Progress(total=mine - skipped, unit="line", quiet=settings.quiet, skipped=skipped)
    out = JsonlAppender(output_path)
    sender = Sender(transport, settings)
    try:
        for line in read_lines(source):
            h = key_hash(_key(line))
            if not shard.owns(h) or h in done:
                continue
            if isinstance(line, BadLine):
                out.write(bad_line(line))
                progress.add("invalid line")
            elif line.problem is not None:
                out.write(refused_line(line))
                progress.add(400)
            else:
                await sender.submit(line.url, orjson.dumps(line.body), 1, _writer(line, out, progress))
        await sender.drain()
    finally:
        out.close()
    return progress.close(f"concurrency peak {sender.pacer.peak}, {sender.pacer.overloads} overload answers")


def _writer(line: BatchLine, out: JsonlAppender, progress: Progress) -> Callable[[Answer | httpx.TransportError], None]:
    """What to do with one line's outcome: its output line and its count."""
    def write(outcome: Answer | httpx.TransportError) -> None:
        if isinstance(outcome, Answer):
            out.write(answer_line(line.custom_id, outcome.status, outcome.content, outcome.request_id))
            progress.add(outcome.status, tokens=prompt_tokens(outcome.content) if outcome.status == 200 else 0)
        else:
            out.write(unreachable_line(line, f"{type(outcome).__name__}: {outcome}"))
            progress.add("unreachable")
    return write
