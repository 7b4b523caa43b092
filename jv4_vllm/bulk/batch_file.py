"""OpenAI batch files: reading input lines and writing output lines.

Input lines are ``{custom_id, method, url, body}``; output lines ``{id, custom_id,
response: {status_code, request_id, body}, error}``, the format of OpenAI's Batch API and
of ``vllm run-batch``. An answer's body is spliced into its line as the bytes the service
sent (no parse and re-encode of the vectors).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from jv4_vllm.bulk.keys import line_key

__all__ = ["BadLine", "BatchLine", "answer_line", "bad_line", "open_input", "output_key", "read_lines",
           "refused_line", "unreachable_line"]

URLS = ("/v1/embeddings", "/v1/rerank")


@dataclass(frozen=True)
class BatchLine:
    number: int
    custom_id: str
    url: str
    body: Any
    problem: str | None = None  # why it is refused without being sent


@dataclass(frozen=True)
class BadLine:
    number: int
    message: str

    @property
    def key(self) -> str:
        return line_key(self.number)


def open_input(path: str, spool_dir: Path | None = None) -> Path:
    """The input as a file: ``-`` (stdin) is copied to a temporary file first, so it can be read
    twice (duplicates are checked before anything is sent) without holding it in memory."""
    if path != "-":
        return Path(path)
    with tempfile.NamedTemporaryFile(prefix="jv4-batch-", suffix=".jsonl", dir=spool_dir, delete=False) as spool:
        shutil.copyfileobj(sys.stdin.buffer, spool, 1 << 20)
    return Path(spool.name)


def _parse(number: int, raw: bytes) -> BatchLine | BadLine:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return BadLine(number, f"line {number}: not valid JSON ({exc})")
    if not isinstance(value, dict):
        return BadLine(number, f"line {number}: must be a JSON object with custom_id, method, url and body")
    custom_id = value.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return BadLine(number, f"line {number}: custom_id is missing (a non-empty string is required)")
    url, method, body = value.get("url"), value.get("method", "POST"), value.get("body")
    problem = None
    if url not in URLS:
        problem = f"line {number}: url must be one of {list(URLS)}, not {url!r}"
    elif not isinstance(method, str) or method.upper() != "POST":
        problem = f"line {number}: method must be POST, not {method!r}"
    elif not isinstance(body, dict):
        problem = f"line {number}: body must be a JSON object"
    return BatchLine(number, custom_id, str(url), body, problem)


def read_lines(path: Path) -> Iterator[BatchLine | BadLine]:
    """Every non-blank line, numbered from 1, parsed (never raises for a bad line)."""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if raw.strip():
                yield _parse(number, raw)


def _line(custom_id: str | None, response: dict[str, Any] | bytes | None, error: Any) -> bytes:
    head = orjson.dumps({"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id})[:-1]
    if isinstance(response, bytes):
        return head + b',"response":' + response + b',"error":' + orjson.dumps(error) + b"}\n"
    return head + b"," + orjson.dumps({"response": response, "error": error})[1:] + b"\n"


def answer_line(custom_id: str, status: int, content: bytes, request_id: str | None) -> bytes:
    """The line of an answered request; a body that is not one line of JSON is wrapped as an error."""
    if not content.startswith((b"{", b"[")) or b"\n" in content:
        try:
            content = orjson.dumps(orjson.loads(content))
        except orjson.JSONDecodeError:
            text = content[:2000].decode("utf-8", "replace")
            content = orjson.dumps({"error": {"message": f"HTTP {status}: {text}", "type": "upstream_error"}})
    rid = orjson.dumps(request_id or f"req_{uuid.uuid4().hex}")
    response = b'{"status_code":' + str(status).encode() + b',"request_id":' + rid + b',"body":' + content + b"}"
    return _line(custom_id, response, None)


def refused_line(line: BatchLine) -> bytes:
    """A line refused before sending (bad url, method or body): a 400 as the router would give."""
    body = {"error": {"message": line.problem, "type": "invalid_request_error", "param": None,
                      "code": "invalid_batch_line"}}
    return _line(line.custom_id, {"status_code": 400, "request_id": f"req_{uuid.uuid4().hex}", "body": body}, None)


def bad_line(line: BadLine) -> bytes:
    """A line that could not be read: no custom_id to answer, so the error names the line."""
    return _line(None, None, {"code": "invalid_batch_line", "message": line.message, "line": line.number})


def unreachable_line(line: BatchLine, message: str) -> bytes:
    """A request the service never answered within the job's give-up time (no HTTP status)."""
    return _line(line.custom_id, None, {"code": "service_unreachable", "message": message})


def output_key(value: Any) -> str | None:
    """The key an output line answers: its custom_id, or the line number of a bad input line."""
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("custom_id"), str):
        return value["custom_id"]
    error = value.get("error")
    if isinstance(error, dict) and isinstance(error.get("line"), int):
        return line_key(error["line"])
    return None
