"""Wire schemas of the router: OpenAI- and Jina-compatible ``/v1/embeddings``.

Pure pydantic models, no I/O: requests check their own fields and convert themselves into
engine options (:meth:`EmbeddingsRequest.options`). The response models document the
shape for OpenAPI; :mod:`jv4_vllm.router.serving` reads inputs and renders responses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    Tag,
)

from jv4_vllm.core.types import EmbedOptions, parse_task
from jv4_vllm.core.wire import EmbeddingType
from jv4_vllm.errors import InvalidRequestError, ModelNotFoundError

__all__ = [
    "EmbeddingItem",
    "EmbeddingsRequest",
    "EmbeddingsResponse",
    "ErrorDetail",
    "ErrorResponse",
    "ImageObject",
    "ModelCard",
    "ModelList",
    "MultiVectorItem",
    "TextObject",
    "Usage",
    "field_path",
]

DEFAULT_TASK = "text-matching"

# Union member tags: they show up in validation error locations and are dropped from them.
_TAGS = frozenset({"one-string", "list", "string", "text-object", "image-object"})


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- request --------------------------------------------------------------------------


class TextObject(_Schema):
    text: StrictStr = Field(description="Text to embed (the task's query/passage prefix is added for you).")


class ImageObject(_Schema):
    image: StrictStr = Field(description="An image as base64, a data URI (data:image/png;base64,...) or, "
                                         "when the server allows it, an http(s) URL.")


def _item_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        has_text, has_image = "text" in value, "image" in value
        return "text-object" if has_text and not has_image else "image-object" if has_image and not has_text else None
    if isinstance(value, TextObject):
        return "text-object"
    if isinstance(value, ImageObject):
        return "image-object"
    return None


def _input_kind(value: Any) -> str | None:
    return "one-string" if isinstance(value, str) else "list" if isinstance(value, list) else None


InputItem = Annotated[
    Annotated[StrictStr, Tag("string")]
    | Annotated[TextObject, Tag("text-object")]
    | Annotated[ImageObject, Tag("image-object")],
    Discriminator(_item_kind, custom_error_type="invalid_input",
                  custom_error_message='each input must be a string, {"text": ...} or {"image": ...}'),
]
InputField = Annotated[
    Annotated[StrictStr, Tag("one-string")] | Annotated[list[InputItem], Tag("list"), Field(min_length=1)],
    Discriminator(_input_kind, custom_error_type="invalid_input",
                  custom_error_message="input must be a string or a non-empty list"),
]


class EmbeddingsRequest(_Schema):
    """OpenAI embeddings request plus the Jina API's fields."""

    model: StrictStr | None = Field(
        None, description="The model name, or one adapter's name `<model>-<task>`; default: the model.")
    input: InputField = Field(
        description='A string, a list of strings, or a list of {"text": ...} / {"image": ...} objects '
                    "(mixed lists allowed). One embedding per input, in order.")
    dimensions: StrictInt | None = Field(
        None, gt=0, description="Matryoshka size of single vectors (one of the model's matryoshka dims).")
    encoding_format: Literal["float", "base64"] | None = Field(
        None, description="OpenAI output encoding; base64 is little-endian float32.")
    user: StrictStr | None = Field(None, description="End-user id (OpenAI field; accepted and ignored).")
    task: StrictStr | None = Field(
        None, description="retrieval.query, retrieval.passage, text-matching (default), code.query or "
                          "code.passage; bare retrieval/code mean the query role.")
    return_multivector: StrictBool = Field(
        False, description="Return one projected vector per token instead of one pooled vector per input.")
    embedding_type: Literal["float", "base64", "binary", "ubinary"] | None = Field(
        None, description="Jina output encoding; binary/ubinary are packed sign bits (int8/uint8).")
    truncate: StrictBool = Field(
        False, description="Cut over-long texts to the model's maximum instead of failing.")

    def output_type(self) -> EmbeddingType:
        """embedding_type wins; encoding_format is the OpenAI spelling of the same choice."""
        if self.embedding_type and self.encoding_format and self.embedding_type != self.encoding_format:
            raise InvalidRequestError(
                f"embedding_type={self.embedding_type!r} contradicts encoding_format={self.encoding_format!r}; "
                "send one of them", param="embedding_type")
        return self.embedding_type or self.encoding_format or "float"

    def resolve_task(self, model_name: str, tasks: Sequence[str]) -> tuple[str, str]:
        """(task, role) from ``task`` and ``model`` (which may name one adapter)."""
        adapter = None
        if self.model is not None and self.model != model_name:
            adapters = {f"{model_name}-{t}": t for t in tasks}
            if self.model not in adapters:
                raise ModelNotFoundError(
                    f"model {self.model!r} is not served here; use one of {[model_name, *adapters]}", param="model")
            adapter = adapters[self.model]
        if self.task is None:
            return adapter or (DEFAULT_TASK if DEFAULT_TASK in tasks else tasks[0]), "query"
        task, role = parse_task(self.task, tasks)
        if adapter is not None and task != adapter:
            raise InvalidRequestError(f"task {self.task!r} contradicts model {self.model!r}", param="task")
        return task, role

    def options(self, model_name: str, tasks: Sequence[str]) -> EmbedOptions:
        """The engine options this request asks for (its own fields checked; the engine checks the rest)."""
        task, role = self.resolve_task(model_name, tasks)
        self.output_type()
        return EmbedOptions(task=task, role=role, dimensions=self.dimensions,  # type: ignore[arg-type]
                            multivector=self.return_multivector, truncate=self.truncate)


def field_path(loc: Sequence[str | int]) -> str | None:
    """``("body", "input", "list", 3, "image-object", "image")`` -> ``input[3].image``."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part not in _TAGS:
            path += f".{part}" if path else part
    return path or None


# --- responses ------------------------------------------------------------------------


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str | list[int] = Field(
        description="float list, base64 of little-endian float32, or packed sign bits (binary/ubinary).")


class MultiVectorItem(BaseModel):
    object: Literal["embeddings"] = "embeddings"
    index: int
    embeddings: list[list[float]] | list[list[int]] | str = Field(
        description="One row per token; with base64, one string of row-major little-endian float32.")
    shape: list[int] | None = Field(None, description="[rows, columns]; present with base64.")


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[EmbeddingItem | MultiVectorItem]
    usage: Usage


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = Field(None, description="The field or input at fault, e.g. input[3] or dimensions.")
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "jinaai"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
