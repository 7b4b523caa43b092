"""What a job shows: a progress bar (items/s, ETA) and a closing summary of counts by status,
tokens and wall time; ``--quiet`` leaves one summary line for logs."""

from __future__ import annotations

import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from tqdm.auto import tqdm

__all__ = ["Progress", "prompt_tokens"]

_TOKENS = re.compile(rb'"prompt_tokens":\s*(\d+)')


def prompt_tokens(body: bytes) -> int:
    """``usage.prompt_tokens`` of an answer, read without parsing the vectors (it comes last)."""
    match = _TOKENS.search(body, max(0, len(body) - 512)) or _TOKENS.search(body)
    return int(match.group(1)) if match else 0


@dataclass
class Progress:
    total: int | None
    unit: str
    quiet: bool = False
    skipped: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    tokens: int = 0
    items: int = 0
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self._bar = tqdm(total=self.total, unit=self.unit, disable=self.quiet, dynamic_ncols=True,
                         file=sys.stderr, desc="jv4-vllm")

    def add(self, status: int | str, items: int = 1, tokens: int = 0) -> None:
        self.statuses[str(status)] += items
        self.items += items
        self.tokens += tokens
        self._bar.update(items)

    def skip(self) -> None:
        """One unit found already done (a rerun): out of the bar's total."""
        self.skipped += 1
        if self._bar.total:
            self._bar.total -= 1
            self._bar.refresh()

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def summary(self, extra: str = "") -> str:
        counts = ", ".join(f"{status}: {n}" for status, n in sorted(self.statuses.items())) or "none"
        rate = self.items / self.seconds if self.seconds > 0 else 0.0
        parts = [f"{self.items} {self.unit}s done ({counts})", f"{self.skipped} already done",
                 f"{self.tokens} tokens", f"{self.seconds:.2f} s", f"{rate:.1f} {self.unit}s/s"]
        return "; ".join(parts) + (f"; {extra}" if extra else "")

    def close(self, extra: str = "") -> str:
        self._bar.close()
        line = self.summary(extra)
        print(f"jv4-vllm: {line}", file=sys.stderr, flush=True)
        return line
