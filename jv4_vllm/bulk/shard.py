"""``--shard I/N``: a stable 1/N of the input, chosen by the hash of each line's id."""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["Shard", "parse_shard"]

JOB_INDEX_ENV = "JOB_COMPLETION_INDEX"  # set by Kubernetes in each pod of an Indexed Job


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    def owns(self, key_hash: int) -> bool:
        return key_hash % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(spec: str | None) -> Shard:
    """``I/N`` with 0 <= I < N; ``job/N`` takes I from JOB_COMPLETION_INDEX (Kubernetes Indexed Jobs)."""
    if not spec:
        return Shard()
    index_text, sep, count_text = spec.partition("/")
    if index_text == "job":
        index_text = os.environ.get(JOB_INDEX_ENV, "")
        if not index_text:
            raise ValueError(f"--shard {spec}: {JOB_INDEX_ENV} is not set")
    try:
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise ValueError(f"--shard must be I/N (for example 0/4), not {spec!r}") from None
    if not sep or count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard {spec}: need 0 <= I < N")
    return Shard(index, count)
