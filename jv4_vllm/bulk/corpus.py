"""Corpus inputs of ``jv4-vllm embed``: JSONL or Parquet rows ``{id, text | image | pdf}``, or a
directory of files (``.txt``/``.md`` texts, images, PDFs), streamed one row at a time.

Image and PDF values are paths (relative to the corpus file), http(s) URLs or base64 /
data URIs; they are read only when their request is built, so the corpus is never held.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

__all__ = ["BadRow", "CorpusRow", "read_corpus", "source_bytes"]

Kind = Literal["text", "image", "pdf"]
KINDS: tuple[Kind, ...] = ("text", "image", "pdf")
TEXT_SUFFIXES = {".txt", ".md"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
PDF_SUFFIXES = {".pdf"}
PARQUET_BATCH = 1024


@dataclass(frozen=True)
class CorpusRow:
    id: str
    kind: Kind
    value: str  # the text, or the image / PDF source
    line: int
    base: Path  # relative paths are read from here
    from_file: bool = False  # a directory's text file: ``value`` is its path


@dataclass(frozen=True)
class BadRow:
    line: int
    message: str


def read_corpus(path: Path) -> Iterator[CorpusRow | BadRow]:
    """Every row of the corpus at ``path``, numbered from 1 (never raises for a bad row)."""
    if path.is_dir():
        yield from _directory(path)
    elif path.suffix.lower() == ".parquet":
        yield from _parquet(path)
    else:
        yield from _jsonl(path)


def _directory(root: Path) -> Iterator[CorpusRow]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    number = 0
    for file in files:
        suffix = file.suffix.lower()
        kind: Kind | None = ("text" if suffix in TEXT_SUFFIXES else "image" if suffix in IMAGE_SUFFIXES
                             else "pdf" if suffix in PDF_SUFFIXES else None)
        if kind is None:
            continue
        number += 1
        yield CorpusRow(file.relative_to(root).as_posix(), kind, str(file), number, root, from_file=kind == "text")


def _row(number: int, value: Any, base: Path) -> CorpusRow | BadRow:
    if not isinstance(value, dict):
        return BadRow(number, f"row {number}: must be an object with id and one of text, image, pdf")
    row_id = value.get("id")
    if isinstance(row_id, int) and not isinstance(row_id, bool):
        row_id = str(row_id)
    if not isinstance(row_id, str) or not row_id:
        return BadRow(number, f"row {number}: id is missing (a non-empty string or an integer is required)")
    given = [kind for kind in KINDS if value.get(kind) is not None]
    if len(given) != 1:
        return BadRow(number, f"row {number} (id {row_id!r}): needs exactly one of text, image, pdf; has {given}")
    content = value[given[0]]
    if not isinstance(content, str) or not content.strip():
        return BadRow(number, f"row {number} (id {row_id!r}): {given[0]} must be a non-empty string")
    return CorpusRow(row_id, given[0], content, number, base)


def _jsonl(path: Path) -> Iterator[CorpusRow | BadRow]:
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                value = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                yield BadRow(number, f"row {number}: not valid JSON ({exc})")
                continue
            yield _row(number, value, path.parent)


def _parquet(path: Path) -> Iterator[CorpusRow | BadRow]:
    import pyarrow.parquet as pq

    source = pq.ParquetFile(path)
    columns = [name for name in ("id", *KINDS) if name in source.schema_arrow.names]
    number = 0
    for batch in source.iter_batches(columns=columns, batch_size=PARQUET_BATCH):
        for value in batch.to_pylist():
            number += 1
            yield _row(number, value, path.parent)


def _is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))


def source_bytes(row: CorpusRow) -> tuple[bytes | None, str | None]:
    """(file bytes, None) for a path; (None, the URL) for a URL; (None, None) for base64 or a data URI."""
    if _is_url(row.value) or row.value.startswith("data:"):
        return None, row.value if _is_url(row.value) else None
    candidate = Path(row.value) if Path(row.value).is_absolute() else row.base / row.value
    try:
        if len(row.value) < 4096 and candidate.is_file():
            return candidate.read_bytes(), None
    except OSError:
        pass
    return None, None


def as_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
