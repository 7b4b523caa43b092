"""Late chunking: one pass over all of a request's texts, one embedding per text from its own span.

As the hosted API does it: the texts are joined with one space, the task prefix goes once in
front, and the whole is embedded in one pass, so every chunk's vectors see the whole document.
Each input then owns a contiguous span of the prompt's tokens:

- the prefix's tokens belong to the first input;
- each joining space belongs to the input after it;
- a token belongs to the input that owns its first character (the tokenizer's offsets).

A prompt longer than the model's window is either cut (``truncate``) or embedded in
overlapping windows of token ids ("long late chunking"): each later window starts ``overlap``
tokens before the previous one ended and its first ``overlap`` rows are dropped, so every
position's hidden state comes from exactly one window, with context on its left.

Pure planning: token ids, spans and windows. The engine sends the windows and pools the spans.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from jv4_vllm.errors import InvalidRequestError

__all__ = ["LateChunkPlan", "plan_late_chunking", "window_bounds"]


@dataclass(frozen=True, slots=True)
class LateChunkPlan:
    token_ids: list[int]  # the whole prompt: task prefix once + inputs joined by one space (possibly cut)
    spans: list[tuple[int, int]]  # per input, [start, stop) into token_ids, in input order
    windows: list[tuple[int, int, int]]  # (start, stop, keep_from): one /pooling call each on
    # token_ids[start:stop]; its output rows r >= keep_from are the hidden states of positions start + r


def plan_late_chunking(tokenizer: Tokenizer, prefix: str, texts: Sequence[str], *, max_tokens: int,
                       truncate: bool, overlap: int) -> LateChunkPlan:
    """Tokenise the joined prompt once and give each input its span (see the module notes).

    Over ``max_tokens``: ``truncate`` cuts the prompt (an input left without tokens is a 400
    naming it); otherwise the prompt is covered by windows of ``max_tokens`` sharing ``overlap``.
    """
    if not texts:
        raise InvalidRequestError("input is empty; send at least one text", param="input")
    starts = _char_starts(prefix, texts)
    encoding = tokenizer.encode(prefix + " ".join(texts), add_special_tokens=False)
    ids = list(encoding.ids)
    first_chars = np.fromiter((start for start, _ in encoding.offsets), dtype=np.int64, count=len(ids))
    owners = np.maximum(np.searchsorted(starts, first_chars, side="right") - 1, 0)
    if owners.size and np.any(np.diff(owners) < 0):
        raise ValueError("the tokenizer's offsets are not in order; cannot assign late-chunking spans")
    cut = len(ids)
    if cut > max_tokens and truncate:
        cut = max_tokens
    counts = np.bincount(owners[:cut], minlength=len(texts))
    for index, count in enumerate(counts.tolist()):
        if count == 0:
            raise _no_tokens(index, cut < len(ids), max_tokens)
    bounds = np.concatenate([[0], np.cumsum(counts)]).tolist()
    spans = [(int(bounds[i]), int(bounds[i + 1])) for i in range(len(texts))]
    return LateChunkPlan(token_ids=ids[:cut], spans=spans, windows=window_bounds(cut, max_tokens, overlap))


def window_bounds(length: int, max_tokens: int, overlap: int) -> list[tuple[int, int, int]]:
    """(start, stop, keep_from) windows of at most ``max_tokens`` covering ``length`` positions once each."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if length <= max_tokens:
        return [(0, length, 0)]
    if not 0 <= overlap < max_tokens:
        raise ValueError(f"late chunking overlap {overlap} must be at least 0 and below the window of "
                         f"{max_tokens} tokens")
    windows = [(0, max_tokens, 0)]
    while windows[-1][1] < length:
        start = windows[-1][1] - overlap
        windows.append((start, min(start + max_tokens, length), overlap))
    return windows


def _char_starts(prefix: str, texts: Sequence[str]) -> np.ndarray:
    """Where each input's characters begin in the joined prompt: 0 for the first (it owns the
    prefix), the joining space before it for every later one."""
    starts = np.empty(len(texts), dtype=np.int64)
    position = len(prefix)
    for index, text in enumerate(texts):
        starts[index] = 0 if index == 0 else position
        position += len(text) + (1 if index else 0)
    return starts


def _no_tokens(index: int, cut: bool, max_tokens: int) -> InvalidRequestError:
    if cut:
        message = (f"has no tokens left: the joined late-chunking prompt is cut at the maximum of "
                   f"{max_tokens} tokens before it; send fewer or shorter inputs, or truncate=false")
    else:
        message = ("has no tokens of its own in the joined late-chunking prompt (its characters "
                   "join the token before it); merge it with its neighbour")
    return InvalidRequestError.about(index, message, sep=" ")
