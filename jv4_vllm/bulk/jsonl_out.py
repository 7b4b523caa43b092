"""An output file of JSON lines that a killed job leaves repairable.

Lines are appended whole with one ``os.write`` each on an ``O_APPEND`` descriptor; a kill
can only leave the last line cut. :func:`repair_jsonl` drops a cut last line (and any line
that does not parse, or repeats an earlier key), so a rerun continues from what is there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

__all__ = ["JsonlAppender", "repair_jsonl"]

CHUNK = 1 << 20


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(offset, line with its newline) of every line; the last may lack the newline."""
    offset = 0
    rest = b""
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            rest += chunk
            start = 0
            while (end := rest.find(b"\n", start)) >= 0:
                yield offset, rest[start:end + 1]
                offset += end + 1 - start
                start = end + 1
            rest = rest[start:]
    if rest:
        yield offset, rest


def repair_jsonl(path: Path, key_of: Callable[[Any], str | None]) -> list[str]:
    """Keys of the complete lines in ``path``, after dropping cut, unreadable or repeated lines."""
    if not path.exists():
        return []
    keys: list[str] = []
    seen: set[str] = set()
    bad: list[int] = []
    size = 0
    for offset, line in _lines(path):
        size = offset + len(line)
        try:
            if not line.endswith(b"\n"):
                raise ValueError("cut")
            key = key_of(orjson.loads(line))
        except (ValueError, TypeError, KeyError):
            key = None
        if key is None or key in seen:
            bad.append(offset)
            continue
        seen.add(key)
        keys.append(key)
    if bad == [] or size == 0:
        return keys
    if len(bad) == 1 and _last_line_at(path, bad[0]):
        os.truncate(path, bad[0])
        return keys
    _rewrite_without(path, set(bad))
    return keys


def _last_line_at(path: Path, offset: int) -> bool:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return b"\n" not in fh.read()[:-1]


def _rewrite_without(path: Path, offsets: set[int]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as out:
        for offset, line in _lines(path):
            if offset not in offsets and line.endswith(b"\n"):
                out.write(line)
    os.replace(tmp, path)


class JsonlAppender:
    """Appends whole lines to ``path`` (``-`` writes to stdout, which cannot be resumed)."""

    def __init__(self, path: str) -> None:
        self._fd = 1 if path == "-" else os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, line: bytes) -> None:
        view = memoryview(line)
        while view:
            view = view[os.write(self._fd, view):]

    def close(self) -> None:
        if self._fd != 1:
            os.close(self._fd)
