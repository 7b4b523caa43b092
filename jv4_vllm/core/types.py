"""Value objects passed between the HTTP layer, the client and the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

import numpy as np

from jv4_vllm.errors import InvalidRequestError

__all__ = ["TASK_NAMES", "EmbedOptions", "EmbedResult", "ImageInput", "Item", "OutputKind", "Role", "TextInput", "parse_task"]

# jina-embeddings-v4's task adapters, as its config's task_names lists them. A service serves
# those its config names; this list is for what cannot ask one (the client, a demo checkpoint).
TASK_NAMES: tuple[str, ...] = ("retrieval", "text-matching", "code")

Role = Literal["query", "passage"]
ROLES: tuple[Role, ...] = ("query", "passage")


@dataclass(frozen=True, slots=True)
class TextInput:
    text: str


@dataclass(frozen=True, slots=True)
class ImageInput:
    """An image already read and checked (see :mod:`jv4_vllm.images`): encoded file bytes."""

    data: bytes
    mime: str
    width: int
    height: int


Item = TextInput | ImageInput


class OutputKind(enum.Enum):
    """What each input becomes: one pooled vector, one row per token, or both from one pass."""

    SINGLE = "single"
    MULTI = "multi"
    BOTH = "both"

    @classmethod
    def of(cls, multivector: bool, dense: bool = False) -> "OutputKind":
        """The kind a request's ``return_multivector`` and ``return_dense`` ask for."""
        return (cls.BOTH if dense else cls.MULTI) if multivector else cls.SINGLE

    @property
    def single(self) -> bool:
        return self is not OutputKind.MULTI

    @property
    def multi(self) -> bool:
        return self is not OutputKind.SINGLE


@dataclass(frozen=True, slots=True)
class EmbedOptions:
    task: str = "retrieval"
    role: Role = "query"
    dimensions: int | None = None
    output: OutputKind = OutputKind.SINGLE  # BOTH: embeddings = single vectors, multivectors = multi
    truncate: bool = False
    late_chunking: bool = False  # one pass over all texts joined; each input pooled over its own span
    pool_factor: int | None = None  # hierarchical token pooling of multi-vectors; None: the config's default


@dataclass(slots=True)
class EmbedResult:
    """One float32 array per input, in input order: [d] single vectors or [n_tokens, P] multi-vectors."""

    embeddings: list[np.ndarray]
    prompt_tokens: int
    multivectors: list[np.ndarray] | None = None  # with OutputKind.BOTH: each input's multi-vector


def parse_task(value: str, known_tasks: list[str] | tuple[str, ...]) -> tuple[str, Role]:
    """'retrieval.passage' -> ('retrieval', 'passage'); a bare task means the query role."""
    task, _, role = value.partition(".")
    if task not in known_tasks:
        allowed = [f"{t}.{r}" for t in known_tasks for r in ROLES if t != "text-matching"]
        allowed += [t for t in known_tasks if t == "text-matching"]
        raise InvalidRequestError(f"unknown task {value!r}; use one of {allowed}", param="task")
    role = role or "query"
    if role not in ROLES:
        raise InvalidRequestError(f"unknown role {role!r} in task {value!r}; use query or passage", param="task")
    return task, role  # type: ignore[return-value]
