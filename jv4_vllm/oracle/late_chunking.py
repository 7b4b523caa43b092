"""Late chunking on the reference encoder: what the service's late-chunking answers must equal.

Written apart from :mod:`jv4_vllm.core.late_chunking` on purpose, so one checks the other: the
joined prompt is tokenised by the reference's own (transformers) tokenizer, spans come from a
per-character owner table, and long prompts are windowed the way Jina's long late chunking
does it (windows start every ``max_tokens - overlap`` tokens; each later one drops its first
``overlap`` rows; the rows are concatenated).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from jv4_vllm.oracle.reference import ReferenceEncoder, text_prefix

__all__ = ["ReferenceLateChunks", "reference_late_chunking"]


@dataclass(frozen=True)
class ReferenceLateChunks:
    token_ids: list[int]  # the joined prompt's ids (cut when truncating)
    owners: np.ndarray  # [n_tokens] the input each token belongs to
    hidden: np.ndarray  # [n_tokens, H] fp32 last hidden states, windows stitched

    def single_vectors(self, truncate_dim: int | None = None) -> np.ndarray:
        """[n_inputs, d]: mean of each input's rows, L2-normalised, optionally Matryoshka-truncated."""
        count = int(self.owners.max()) + 1
        means = np.stack([self.hidden[self.owners == i].mean(axis=0, dtype=np.float32) for i in range(count)])
        vectors = _l2(means)
        return _l2(vectors[:, :truncate_dim]) if truncate_dim is not None else vectors

    def rows_of(self, index: int) -> np.ndarray:
        """The hidden-state rows of one input."""
        return self.hidden[self.owners == index]


def reference_late_chunking(encoder: ReferenceEncoder, texts: Sequence[str], task: str = "retrieval",
                            prompt_name: str = "query", *, max_tokens: int, truncate: bool = False,
                            overlap: int = 256) -> ReferenceLateChunks:
    """Embed ``texts`` joined by one space, with the task prefix once, in one pass (or windows)."""
    prefix = text_prefix(task, prompt_name)
    joined = prefix + " ".join(texts)
    owner_of_char: list[int] = [0] * len(prefix)
    for index, text in enumerate(texts):
        owner_of_char += [index] * (len(text) + (1 if index else 0))  # the joining space goes with the text after it
    encoded = encoder.processor.tokenizer(joined, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(encoded["input_ids"])
    owners = np.array([owner_of_char[min(start, len(joined) - 1)] for start, _ in encoded["offset_mapping"]])
    if truncate:
        ids, owners = ids[:max_tokens], owners[:max_tokens]
    if len(set(owners.tolist())) != len(texts):
        raise ValueError("an input has no tokens in the joined prompt")
    return ReferenceLateChunks(ids, owners, _windowed_hidden(encoder, ids, task, max_tokens, overlap))


def _windowed_hidden(encoder: ReferenceEncoder, ids: list[int], task: str, max_tokens: int,
                     overlap: int) -> np.ndarray:
    if len(ids) <= max_tokens:
        return encoder.token_hidden_states(ids, task)
    parts = []
    for start in range(0, len(ids), max_tokens - overlap):
        hidden = encoder.token_hidden_states(ids[start:start + max_tokens], task)
        parts.append(hidden if start == 0 else hidden[overlap:])
        if start + max_tokens >= len(ids):
            break
    return np.concatenate(parts)[:len(ids)]


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)
