"""Stable 64-bit keys for ``custom_id`` / ``id`` values, and compact sets of them.

A job over millions of lines keeps one 8-byte hash per line (for duplicates, for what is
already done), never the strings: memory stays a small fraction of the input.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

__all__ = ["KeySet", "key_hash", "line_key"]


def key_hash(key: str) -> int:
    """The same number on every machine and Python (unlike ``hash``), so shards agree."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def line_key(line_number: int) -> str:
    """The key of an input line that has no usable id of its own (not JSON, no custom_id)."""
    return f"\x00line:{line_number}"


class KeySet:
    """A sorted array of key hashes; ``in`` is a binary search."""

    def __init__(self, hashes: Iterable[int] | np.ndarray = ()) -> None:
        values = hashes if isinstance(hashes, np.ndarray) else np.fromiter(hashes, dtype=np.uint64)
        self._sorted = np.unique(values.astype(np.uint64, copy=False))

    def __contains__(self, value: int) -> bool:
        i = int(np.searchsorted(self._sorted, np.uint64(value)))
        return i < len(self._sorted) and int(self._sorted[i]) == value

    def __len__(self) -> int:
        return len(self._sorted)

    @staticmethod
    def repeated(hashes: Iterable[int]) -> set[int]:
        """The hashes that occur more than once."""
        values = np.sort(np.fromiter(hashes, dtype=np.uint64))
        same = values[1:] == values[:-1]
        return {int(v) for v in values[1:][same]}
