"""``jv4-vllm embed``: a corpus into Parquet (and Qdrant), resumable, sharded, streamed.

Texts go ``batch_size`` per request, images ``image_batch_size``; a PDF is read once,
its page count planned locally, and its pages sent ``image_batch_size`` at a time (the
service renders each page once). PDFs and images are read in a pass of their own, beside
the texts' pass, and their requests take free slots before texts: the longest requests
then overlap the many short ones instead of running alone at the job's end (longest first
is what keeps a pool busy to its last answer). Answers are buffered into row groups of
``row_group_size`` rows (or ~64 MB, or a few seconds' worth), each written whole: a rerun
finds the (id, page) pairs already there and sends only the rest. A request the service
refuses is split to find the input at fault; refused inputs go to ``<output>.errors.jsonl``.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow.parquet as pq

from jv4_vllm.bulk.corpus import BadRow, CorpusRow, as_base64, read_corpus, source_bytes
from jv4_vllm.bulk.job import JobSettings, Sender, check_unique
from jv4_vllm.bulk.jsonl_out import JsonlAppender
from jv4_vllm.bulk.keys import KeySet, key_hash, line_key
from jv4_vllm.bulk.parquet_out import ParquetAppender, repair_parquet
from jv4_vllm.bulk.progress import Progress, prompt_tokens
from jv4_vllm.bulk.rows import RowBuffer, decode_answer, schema_for
from jv4_vllm.bulk.shard import Shard
from jv4_vllm.bulk.transport import Answer, Transport

__all__ = ["EmbedSettings", "JobRefused", "embed", "row_key"]

log = logging.getLogger("jv4_vllm.bulk")
EMBEDDINGS = "/v1/embeddings"
FLUSH_BYTES = 64 << 20
FLUSH_SECONDS = 5.0
PASSES = (frozenset({"pdf", "image"}), frozenset({"text", "invalid"}))  # the first one's requests go ahead


@dataclass(frozen=True)
class EmbedSettings:
    task: str
    multivector: bool = False
    dimensions: int | None = None
    batch_size: int = 32
    image_batch_size: int = 8
    row_group_size: int = 256
    qdrant: str | None = None
    collection: str | None = None
    model: str = "jina-embeddings-v4"


def row_key(row_id: str, page: int | None) -> int:
    return key_hash(row_id if page is None else f"{row_id}\x00{page}")


@dataclass
class _Request:
    rows: list[CorpusRow]
    inputs: list[dict[str, Any]]
    pdf_pages: tuple[int, ...] = ()  # for a PDF page batch: its pages

    @property
    def ahead(self) -> bool:
        """Pages and images: long requests, sent before texts that wait."""
        return bool(self.pdf_pages) or any("image" in item for item in self.inputs)


@dataclass
class _State:
    buffer: RowBuffer = field(default_factory=RowBuffer)
    last_flush: float = field(default_factory=time.monotonic)
    pdf_batches_left: dict[str, int] = field(default_factory=dict)


class _Job:
    def __init__(self, output: Path, transport: Transport, settings: JobSettings, options: EmbedSettings,
                 progress: Progress) -> None:
        self.output, self.options, self.progress = output, options, progress
        self.sender = Sender(transport, settings)
        self.state = _State()
        self.appender: Any = None
        self.sink: Any = None
        self.errors: JsonlAppender | None = None
        self._write_lock = asyncio.Lock()
        if options.qdrant:
            from jv4_vllm.bulk.qdrant_sink import QdrantSink
            self.sink = QdrantSink(options.qdrant, options.collection or "")

    # ---- requests -------------------------------------------------------------------------------
    def body(self, inputs: list[dict[str, Any]]) -> bytes:
        o = self.options
        body: dict[str, Any] = {"model": o.model, "input": inputs, "task": o.task, "embedding_type": "base64"}
        if o.multivector:
            body.update(return_multivector=True, return_dense=True)
        if o.dimensions is not None:
            body["dimensions"] = o.dimensions
        return orjson.dumps(body)

    async def submit(self, request: _Request) -> None:
        await self.sender.submit(EMBEDDINGS, lambda: self.body(request.inputs),
                                 max(len(request.rows), len(request.pdf_pages)),
                                 lambda answer: self.answered(request, answer), ahead=request.ahead)

    async def follow_up(self, request: _Request) -> None:
        """Send ``request`` from an answer's callback (see ``Sender.call``)."""
        await self.sender.call(EMBEDDINGS, self.body(request.inputs), len(request.rows),
                               lambda answer: self.answered(request, answer), ahead=True)

    async def answered(self, request: _Request, outcome: Any) -> None:
        if isinstance(outcome, Answer) and outcome.status == 200:
            payload = orjson.loads(outcome.content)
            vectors = decode_answer(payload, self.options.multivector)
            self.progress.tokens += prompt_tokens(outcome.content)
            if request.pdf_pages:
                row = request.rows[0]
                for page, dense, multi in vectors:
                    self.state.buffer.add(row.id, page, dense, multi)
                self._pdf_batch_done(row.id, "200")
            else:
                for row, (_, dense, multi) in zip(request.rows, vectors, strict=True):
                    self.state.buffer.add(row.id, None, dense, multi)
                self.progress.add(200, len(request.rows))
            await self.maybe_flush()
            return
        status = outcome.status if isinstance(outcome, Answer) else "unreachable"
        if isinstance(outcome, Answer) and 400 <= outcome.status < 500:
            _refuse_job_wide(outcome)
        if isinstance(outcome, Answer) and 400 <= outcome.status < 500 and len(request.rows) > 1:
            # find the input the service refuses: each alone, inside this request's own room
            await asyncio.gather(*(self.follow_up(_Request([row], [item]))
                                   for row, item in zip(request.rows, request.inputs, strict=True)))
            return
        self.refused(request, status, outcome.content if isinstance(outcome, Answer) else str(outcome).encode())

    def refused(self, request: _Request, status: int | str, content: bytes) -> None:
        error = _error_of(content)
        if self.errors is None:
            self.errors = JsonlAppender(str(self.output) + ".errors.jsonl")
        for row in request.rows:
            self.errors.write(orjson.dumps({"id": row.id, "row": row.line, "pages": list(request.pdf_pages) or None,
                                            "status": status, "error": error}) + b"\n")
        if request.pdf_pages:
            self._pdf_batch_done(request.rows[0].id, str(status))
        else:
            self.progress.add(status, len(request.rows))

    def _pdf_batch_done(self, row_id: str, status: str) -> None:
        left = self.state.pdf_batches_left[row_id] - 1
        self.state.pdf_batches_left[row_id] = left
        if left == 0:
            del self.state.pdf_batches_left[row_id]
            self.progress.add(status)

    # ---- output ---------------------------------------------------------------------------------
    async def maybe_flush(self, force: bool = False) -> None:
        state = self.state
        due = (len(state.buffer) >= self.options.row_group_size or state.buffer.nbytes >= FLUSH_BYTES
               or time.monotonic() - state.last_flush >= FLUSH_SECONDS)
        if not len(state.buffer) or not (due or force):
            return
        buffer, state.buffer, state.last_flush = state.buffer, RowBuffer(), time.monotonic()
        async with self._write_lock:
            await asyncio.to_thread(self._write, buffer)

    def _write(self, buffer: RowBuffer) -> None:
        if self.appender is None:
            multi_dim = buffer.multi[0].shape[1] if buffer.multi else None
            self.appender = ParquetAppender(self.output, schema_for(len(buffer.dense[0]), multi_dim))
        if self.sink is not None:  # Qdrant first: a kill between the two resends rows, never loses them
            self.sink.upsert(buffer.ids, buffer.pages, buffer.dense, buffer.multi or None)
        self.appender.append(buffer.table(self.appender.schema))

    def close(self) -> None:
        if self.appender is not None:
            self.appender.close()
        if self.sink is not None:
            self.sink.close()
        if self.errors is not None:
            self.errors.close()


class JobRefused(ValueError):
    """The service refuses what every request of the job asks (an option, not an input)."""


def _error_of(content: bytes) -> Any:
    """The ``error`` object of a refusal, or its text when the body is not the service's JSON."""
    try:
        return orjson.loads(content).get("error", content.decode("utf-8", "replace"))
    except (orjson.JSONDecodeError, AttributeError):
        return content[:2000].decode("utf-8", "replace")


def _refuse_job_wide(answer: Answer) -> None:
    """Stop the job on a 4xx that names a request field other than ``input``: the job's own
    options (``--dimensions``, ``--task``, the model) are wrong, and every request would get it."""
    error = _error_of(answer.content)
    param = error.get("param") if isinstance(error, dict) else None
    if isinstance(param, str) and param and not param.startswith("input") and answer.status not in (401, 403):
        raise JobRefused(f"the service refuses this job's {param}: {error.get('message')} (nothing more is sent; "
                         f"fix the option and rerun with the same output)")


def _done_keys(output: Path) -> tuple[KeySet, KeySet]:
    """(row keys, ids) already in ``output``, after repairing a file cut short by a kill (8 bytes each)."""
    if not output.exists():
        return KeySet(), KeySet()
    repair_parquet(output)
    keys, ids = array("Q"), array("Q")
    for batch in pq.ParquetFile(output).iter_batches(columns=["id", "page"], batch_size=65536):
        for row_id, page in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            keys.append(row_key(row_id, page))
            ids.append(key_hash(row_id))
    return KeySet(np.frombuffer(keys, dtype=np.uint64)), KeySet(np.frombuffer(ids, dtype=np.uint64))


def _kind(row: CorpusRow | BadRow) -> str:
    return row.kind if isinstance(row, CorpusRow) else "invalid"


def _rows_of(source: Path, shard: Shard, kinds: frozenset[str]) -> Iterator[CorpusRow | BadRow]:
    """This shard's rows of these kinds, in corpus order."""
    return (row for row in read_corpus(source) if _kind(row) in kinds and shard.owns(_shard_key(row)))


def _shard_key(row: CorpusRow | BadRow) -> int:
    """Rows by id; an unreadable row by its line number (so exactly one shard reports it)."""
    return key_hash(row.id) if isinstance(row, CorpusRow) else key_hash(line_key(row.line))


async def _inputs(row: CorpusRow) -> dict[str, Any]:
    """The request input of a text or image row (its file read, its URL fetched by the job)."""
    if row.kind == "text":
        text = await asyncio.to_thread(Path(row.value).read_text, "utf-8") if row.from_file else row.value
        return {"text": text}
    data, url = await asyncio.to_thread(source_bytes, row)
    if url is not None:
        data = await _fetch(url, row)
    return {row.kind: as_base64(data) if data is not None else row.value}


async def _fetch(url: str, row: CorpusRow) -> bytes:
    from jv4_vllm.client.fetch import fetch_own_url
    from jv4_vllm.config import LimitsConfig

    limits = LimitsConfig()
    cap = limits.max_pdf_bytes if row.kind == "pdf" else limits.max_image_bytes
    return await fetch_own_url(url, max_bytes=cap, timeout_s=60.0, index=row.line - 1, what=row.kind)


async def _pdf_pages(row: CorpusRow) -> tuple[str, tuple[int, ...]]:
    """The PDF as base64 and its page numbers (counted here; rendering is the service's)."""
    data, url = await asyncio.to_thread(source_bytes, row)
    if url is not None:
        data = await _fetch(url, row)
    return await asyncio.to_thread(_plan_pages, row, data)


def _plan_pages(row: CorpusRow, data: bytes | None) -> tuple[str, tuple[int, ...]]:
    from jv4_vllm.config import LimitsConfig
    from jv4_vllm.core.pdf import plan_pdf, read_pdf_bytes

    if data is None:
        data = read_pdf_bytes(row.value, LimitsConfig(), row.line - 1)
    plan = plan_pdf(data, None, LimitsConfig(max_pdf_pages_per_request=1 << 30), row.line - 1)
    return as_base64(data), plan.pages


async def embed(input_path: str, output_path: str, transport: Transport, settings: JobSettings,
                options: EmbedSettings) -> str:
    """Embed every row this shard owns that ``output_path`` lacks; returns the closing summary."""
    if options.batch_size < 1 or options.image_batch_size < 1 or options.row_group_size < 1:
        raise ValueError("--batch-size, --image-batch-size and --row-group-size must be at least 1")
    source, output, shard = Path(input_path), Path(output_path), settings.shard
    if not source.exists():
        raise FileNotFoundError(f"corpus {source} does not exist")
    kinds = Counter(_kind(r) for r in read_corpus(source) if shard.owns(_shard_key(r)))
    if kinds["pdf"]:  # loaded before the first request, not in a thread competing with the service
        importlib.import_module("jv4_vllm.core.pdf")
    check_unique(lambda: ((r.id, r.line) for r in read_corpus(source) if isinstance(r, CorpusRow)), "id")
    done, done_ids = _done_keys(output)
    Path(f"{output}.errors.jsonl").unlink(missing_ok=True)  # this run's refusals (all of them are retried)
    progress = Progress(total=sum(kinds.values()), unit="row", quiet=settings.quiet)
    job = _Job(output, transport, settings, options, progress)

    async def flush_batch(rows: list[CorpusRow]) -> None:
        if rows:
            await job.submit(_Request(list(rows), [await _inputs(r) for r in rows]))
            rows.clear()

    async def one_pass(kinds_here: frozenset[str]) -> None:
        texts: list[CorpusRow] = []
        images: list[CorpusRow] = []
        for row in _rows_of(source, shard, kinds_here):
            if isinstance(row, BadRow):
                progress.add("invalid row")
                log.warning("%s", row.message)
                continue
            if row.kind == "pdf":
                await _submit_pdf(job, row, done, done_ids, options)
            elif row_key(row.id, None) in done:
                progress.skip()
            else:
                batch, size = (texts, options.batch_size) if row.kind == "text" else (images, options.image_batch_size)
                batch.append(row)
                if len(batch) >= size:
                    await flush_batch(batch)
        await flush_batch(texts)
        await flush_batch(images)

    try:
        try:
            async with asyncio.TaskGroup() as passes:
                for kinds_here in PASSES:
                    if any(kinds[kind] for kind in kinds_here):  # a pass only where there are rows
                        passes.create_task(one_pass(kinds_here))
        except ExceptionGroup as failed:  # the first failure, as the job's own error
            raise failed.exceptions[0] from None
        await job.sender.drain()
        await job.maybe_flush(force=True)
    finally:
        job.close()
    return progress.close(f"concurrency peak {job.sender.pacer.peak}, {job.sender.pacer.overloads} overload answers")


async def _submit_pdf(job: _Job, row: CorpusRow, done: KeySet, done_ids: KeySet, options: EmbedSettings) -> None:
    try:
        data, pages = await _pdf_pages(row)
    except Exception as exc:  # noqa: BLE001 - any unreadable PDF is this row's error, not the job's
        job.state.pdf_batches_left[row.id] = 1
        message = getattr(exc, "message", str(exc))
        job.refused(_Request([row], [], (0,)), 400, orjson.dumps({"error": {"message": message}}))
        return
    if key_hash(row.id) in done_ids:
        pages = tuple(p for p in pages if row_key(row.id, p) not in done)
    if not pages:
        job.progress.skip()
        return
    from jv4_vllm.core.pdf import format_pages

    chunks = [pages[i:i + options.image_batch_size] for i in range(0, len(pages), options.image_batch_size)]
    job.state.pdf_batches_left[row.id] = len(chunks)
    for chunk in chunks:
        await job.submit(_Request([row], [{"pdf": data, "pages": format_pages(chunk)}], chunk))
