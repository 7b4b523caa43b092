"""An output file of JSON lines that a killed job leaves repairable.

Lines are appended whole with one ``os.write`` each on an ``O_APPEND`` descriptor; a kill
can only leave the last line cut. :func:`repair_jsonl` drops a cut last line (and any line
that does not parse, or repeats an earlier key), so a rerun continues from what is there.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from jv4_vllm.bulk.keys import key_hash

__all__ = ["JsonlAppender", "repair_jsonl"]



def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(offset, line with its newline) of every line; the last may lack the newline."""
    offset = 0
    with open(path, "rb") as fh:
        for line in fh:
            yield offset, line
            offset += len(line)


def repair_jsonl(path: Path, key_of: Callable[[Any], str | None]) -> np.ndarray:
    """Key hashes of the complete lines in ``path``, after dropping cut, unreadable or repeated lines.

    Only 16 bytes per line are kept (hash and offset), whatever the lines hold.
    """
    if not path.exists():
        return np.zeros(0, dtype=np.uint64)
    hashes, offsets = array("Q"), array("q")
    bad: list[int] = []
    for offset, line in _lines(path):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("cut")
            key = key_of(orjson.loads(line))
        except (ValueError, TypeError, KeyError):
            key = None
        if key is None:
            bad.append(offset)
        else:
            hashes.append(key_hash(key))
            offsets.append(offset)
    values = np.frombuffer(hashes, dtype=np.uint64) if hashes else np.zeros(0, dtype=np.uint64)
    order = np.argsort(values, kind="stable")
    repeats = order[1:][values[order][1:] == values[order][:-1]]  # every occurrence after the first
    if len(repeats):
        bad += [offsets[i] for i in repeats]
        values = np.delete(values, repeats)
    if not bad:
        return values
    if len(bad) == 1 and _last_line_at(path, bad[0]):
        os.truncate(path, bad[0])
    else:
        _rewrite_without(path, set(bad))
    return values


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
