"""Wire schemas of the router: OpenAI- and Jina-compatible ``/v1/embeddings`` and ``/v1/rerank``.

Pure pydantic models, no I/O: requests check their own fields and convert themselves into
engine options (:meth:`EmbeddingsRequest.options`). The response models document the
shape for OpenAPI; :mod:`jv4_vllm.router.serving` reads inputs and renders responses.

Rerank has the shape Jina, Cohere and vLLM share: ``{model, query, documents, top_n,
return_documents}`` -> ``{model, usage, results: [{index, relevance_score, document?}]}``,
best first.
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
    field_validator,
)

from jv4_vllm.core.images import has_url_scheme
from jv4_vllm.core.types import EmbedOptions, OutputKind, Role, parse_task
from jv4_vllm.core.wire import EmbeddingType
from jv4_vllm.errors import InvalidRequestError, ModelNotFoundError

__all__ = [
    "BytesObject",
    "EmbeddingItem",
    "EmbeddingsRequest",
    "EmbeddingsResponse",
    "ErrorDetail",
    "ErrorResponse",
    "ImageObject",
    "ModelCard",
    "ModelList",
    "MultiVectorItem",
    "PageEmbedding",
    "PagesItem",
    "PdfObject",
    "RerankRequest",
    "RerankResponse",
    "RerankResult",
    "TextObject",
    "UrlObject",
    "Usage",
    "ERROR_DESCRIPTIONS",
    "adapter_task",
    "error_responses",
    "field_path",
    "resolve_task",
]

DEFAULT_TASK = "text-matching"  # as Jina's API
RERANK_DEFAULT_TASK = "retrieval"

# Union member tags: they show up in validation error locations and are dropped from them.
_TAGS = frozenset({"one-string", "list", "string", "text-object", "image-object", "url-object", "bytes-object",
                    "pdf-object"})


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- request --------------------------------------------------------------------------


class TextObject(_Schema):
    text: StrictStr = Field(description="Text to embed (the task's query/passage prefix is added for you).")


class ImageObject(_Schema):
    image: StrictStr = Field(description="An image as base64, a data URI (data:image/png;base64,...) or, "
                                         "when the server allows it, an http(s) URL.")


class UrlObject(_Schema):
    url: StrictStr = Field(description="Jina's older image item: an http(s) URL (when the server allows image "
                                       "URLs) or a data URI; same limits as image.")

    @field_validator("url")
    @classmethod
    def _url_or_data_uri(cls, value: str) -> str:
        if not (has_url_scheme(value) or value[:5].lower() == "data:"):
            raise ValueError("must be an http(s) URL or a data URI (send base64 as {\"bytes\": ...})")
        return value


class BytesObject(_Schema):
    bytes: StrictStr = Field(description="Jina's older image item: the image file as base64 (or a data URI); "
                                         "same limits as image.")

    @field_validator("bytes")
    @classmethod
    def _not_url(cls, value: str) -> str:
        if has_url_scheme(value):
            raise ValueError('must be base64 image bytes, not a URL (send URLs as {"url": ...})')
        return value


class PdfObject(_Schema):
    pdf: StrictStr = Field(description="A PDF as base64, a data URI (data:application/pdf;base64,...), when "
                                       "the server allows URLs an http(s) URL, or sha256:<hex> naming a PDF "
                                       "this caller sent before with keep. Each selected page is rendered "
                                       "at limits.render_dpi and embedded as an image.")
    pages: StrictStr | None = Field(
        None, description='Pages to embed, 1-based: "1-3,7", "5-" (to the end), "-2"; default: every page.')
    keep: StrictBool = Field(
        False, description="Keep the file on the router (bounded by limits.max_kept_pdf_bytes) so later requests "
                           "may send sha256:<hex of the file> instead of its bytes; a reference the router no "
                           "longer holds is a 400 with code pdf_not_kept.")


# The key that names an object item's kind; an object with none or several of them is refused.
_OBJECT_KINDS: dict[str, str] = {
    "text": "text-object", "image": "image-object", "url": "url-object", "bytes": "bytes-object",
    "pdf": "pdf-object",
}
_MODEL_KINDS: dict[type[BaseModel], str] = {
    TextObject: "text-object", ImageObject: "image-object", UrlObject: "url-object", BytesObject: "bytes-object",
    PdfObject: "pdf-object",
}


def _item_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        kinds = [tag for key, tag in _OBJECT_KINDS.items() if key in value]
        return kinds[0] if len(kinds) == 1 else None
    return _MODEL_KINDS.get(type(value))


def _input_kind(value: Any) -> str | None:
    return "one-string" if isinstance(value, str) else "list" if isinstance(value, list) else None


InputItem = Annotated[
    Annotated[StrictStr, Tag("string")]
    | Annotated[TextObject, Tag("text-object")]
    | Annotated[ImageObject, Tag("image-object")]
    | Annotated[UrlObject, Tag("url-object")]
    | Annotated[BytesObject, Tag("bytes-object")]
    | Annotated[PdfObject, Tag("pdf-object")],
    Discriminator(_item_kind, custom_error_type="invalid_input",
                  custom_error_message='each input must be a string, {"text": ...}, {"image": ...}, '
                                       '{"url": ...}, {"bytes": ...} or {"pdf": ...}'),
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
                    '(Jina\'s older {"url": ...} / {"bytes": ...} image items too; mixed lists allowed). '
                    "One embedding per input, in order.")
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
    encoding_type: Literal["float", "base64", "binary", "ubinary"] | None = Field(
        None, description="Another name for embedding_type (Jina's client libraries send this one).")
    truncate: StrictBool = Field(
        False, description="Cut over-long texts to the model's maximum instead of failing. With late_chunking: "
                           "cut the joined prompt (an input left with no tokens is a 400); without it, a joined "
                           "prompt over the maximum is embedded in overlapping windows.")
    late_chunking: StrictBool = Field(
        False, description="Join the text inputs with one space (task prefix once in front), embed them in one "
                           "pass and pool each input over its own tokens: chunk embeddings that see the whole "
                           "document, one per input in order. Texts only (an image is a 400). Combines with "
                           "dimensions, every embedding_type, return_multivector (each input gets its span's "
                           "rows) and return_dense.")
    return_dense: StrictBool = Field(
        False, description="With return_multivector: each item also carries the input's single vector as "
                           "`embedding` (honouring dimensions and embedding_type), from the same vLLM pass. "
                           "Without return_multivector it changes nothing.")
    multivector_pool_factor: StrictInt | None = Field(
        None, ge=1, description="With return_multivector: hierarchical token pooling (Ward clusters of each "
                                "input's rows, their normalised means) down to max(rows // factor, 1) rows; "
                                "binary/ubinary pack the pooled rows. 1 keeps every row; default: the "
                                "server's defaults.multivector_pool_factor (1). Per chunk with late_chunking.")

    def output_type(self) -> EmbeddingType:
        """One choice under three names: embedding_type, encoding_type (Jina) and encoding_format (OpenAI)."""
        given = [(name, value) for name, value in (("embedding_type", self.embedding_type),
                                                   ("encoding_type", self.encoding_type),
                                                   ("encoding_format", self.encoding_format)) if value]
        for name, value in given[1:]:
            if value != given[0][1]:
                raise InvalidRequestError(
                    f"{given[0][0]}={given[0][1]!r} contradicts {name}={value!r}; send one of them",
                    param=given[0][0])
        return given[0][1] if given else "float"  # type: ignore[return-value]

    def options(self, model_name: str, tasks: Sequence[str]) -> EmbedOptions:
        """The engine options this request asks for (its own fields checked; the engine checks the rest)."""
        task, role = resolve_task(self.model, self.task, model_name, tasks, default=DEFAULT_TASK)
        self.output_type()
        if self.multivector_pool_factor is not None:
            if not self.return_multivector:
                raise InvalidRequestError("multivector_pool_factor pools multi-vector rows: send it with "
                                          "return_multivector=true", param="multivector_pool_factor")
            if self.dimensions is not None and not self.return_dense:
                raise InvalidRequestError(
                    "multivector_pool_factor cannot be combined with dimensions: pooled rows keep the "
                    "multi-vector size (dimensions applies to single vectors, with return_dense)",
                    param="multivector_pool_factor")
        return EmbedOptions(task=task, role=role, dimensions=self.dimensions,  # type: ignore[arg-type]
                            output=OutputKind.of(self.return_multivector, self.return_dense),
                            truncate=self.truncate, late_chunking=self.late_chunking,
                            pool_factor=self.multivector_pool_factor)


ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "Invalid request: the message and param name the field or input index",
    401: "Missing or invalid API key",
    404: "Unknown model",
    413: "Request body, image or input count over the limit",
    429: "Overloaded; retry after Retry-After seconds",
    502: "A vLLM replica failed or answered badly (retried once on another replica first)",
    503: "No healthy backend for the task; retry after Retry-After seconds",
    504: "The backend did not answer within the configured timeout",
}


def error_responses(**overrides: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` of a route: every error status with its body model (``s400="..."``
    replaces one description)."""
    texts = {**ERROR_DESCRIPTIONS, **{int(k[1:]): v for k, v in overrides.items()}}
    return {status: {"model": ErrorResponse, "description": text} for status, text in texts.items()}


def resolve_task(model: str | None, task: str | None, model_name: str, tasks: Sequence[str], *,
                 default: str, fixed_roles: bool = False) -> tuple[str, Role]:
    """(task, role) from a request's ``task`` and ``model`` (which may name one adapter).

    Without ``task``: the adapter ``model`` names, else ``default``, with the query role.
    ``fixed_roles`` (rerank) refuses a role in ``task``: the route sets the roles itself.
    """
    adapter = adapter_task(model, model_name, tasks)
    if task is None:
        return adapter or (default if default in tasks else tasks[0]), "query"
    if fixed_roles and "." in task:
        raise InvalidRequestError(
            f"task {task!r}: rerank sets the roles itself (the query gets the query role, documents "
            "the passage role); send a bare task such as 'retrieval'", param="task")
    name, role = parse_task(task, tasks)
    if adapter is not None and name != adapter:
        raise InvalidRequestError(f"task {task!r} contradicts model {model!r}", param="task")
    return name, role


def adapter_task(model: str | None, model_name: str, tasks: Sequence[str]) -> str | None:
    """The task a ``model`` field names (``<model>-<task>``), None for the model itself; 404 otherwise."""
    if model is None or model == model_name:
        return None
    adapters = {f"{model_name}-{t}": t for t in tasks}
    if model not in adapters:
        raise ModelNotFoundError(f"model {model!r} is not served here; use one of {[model_name, *adapters]}",
                                 param="model")
    return adapters[model]


def field_path(loc: Sequence[str | int]) -> str | None:
    """``("body", "input", "list", 3, "image-object", "image")`` -> ``input[3].image``."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part not in _TAGS:
            path += f".{part}" if path else part
    return path or None


class RerankRequest(_Schema):
    """A query and documents to order by relevance."""

    model: StrictStr | None = Field(
        None, description="The model name, or one adapter's name `<model>-<task>`; default: the model.")
    query: InputItem = Field(description='A string, {"text": ...} or an image ({"image": ...}).')
    documents: list[InputItem] = Field(
        description='Strings, {"text": ...}, {"image": ...} or {"pdf": ..., "pages": ...} objects (mixed lists '
                    "allowed). A PDF ranks as its best page.")
    top_n: StrictInt | None = Field(None, gt=0, description="Return only the best top_n results; default: all.")
    return_documents: StrictBool = Field(True, description="Echo each result's document as sent.")
    task: StrictStr | None = Field(
        None, description="retrieval (default), text-matching or code; roles are fixed (query / passage).")
    scoring: Literal["maxsim", "dense"] = Field(
        "maxsim", description="maxsim: late interaction over the task's multi-vectors; dense: cosine of "
                              "single vectors.")
    truncate: StrictBool = Field(False, description="Cut over-long texts to the model's maximum instead of failing.")
    multivector_pool_factor: StrictInt | None = Field(
        None, ge=1, description="maxsim over the documents' rows pooled as /v1/embeddings pools them "
                                "(hierarchical token pooling, about 1/factor of the rows); the query keeps "
                                "every row. Default: the server's defaults.multivector_pool_factor (1).")

    def resolve_task(self, model_name: str, tasks: Sequence[str]) -> str:
        """The task from ``task`` and ``model``; the roles are the route's."""
        if self.multivector_pool_factor is not None and self.scoring != "maxsim":
            raise InvalidRequestError("multivector_pool_factor pools the documents' multi-vectors: it needs "
                                      "scoring=maxsim", param="multivector_pool_factor")
        return resolve_task(self.model, self.task, model_name, tasks, default=RERANK_DEFAULT_TASK,
                            fixed_roles=True)[0]


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
    embedding: list[float] | str | list[int] | None = Field(
        None, description="With return_dense: the input's single vector, as in an embedding item.")


class PageEmbedding(BaseModel):
    page: int = Field(description="1-based page number in the PDF.")
    object: Literal["embedding", "embeddings"]
    embedding: list[float] | str | list[int] | None = Field(None, description="Single vector of the page.")
    embeddings: list[list[float]] | list[list[int]] | str | None = Field(
        None, description="Multi-vector of the page (return_multivector), one row per token.")
    shape: list[int] | None = Field(None, description="[rows, columns] of a base64 multi-vector.")


class PagesItem(BaseModel):
    """The answer to one {"pdf": ...} input: its selected pages in page order."""

    object: Literal["pages"] = "pages"
    index: int
    pages: list[PageEmbedding]


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[EmbeddingItem | MultiVectorItem | PagesItem]
    usage: Usage


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = Field(None, description="The field or input at fault, e.g. input[3] or dimensions.")
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
    detail: str = Field(description="The same message again, where Jina's client libraries read it.")


class RerankResult(BaseModel):
    index: int = Field(description="Position of the document in the request.")
    relevance_score: float = Field(description="MaxSim (sum over query tokens) or cosine; higher is better.")
    page: int | None = Field(None, description="For a PDF document: the 1-based page that scored best.")
    document: dict[str, Any] | None = Field(None, description="The document as sent (return_documents).")


class RerankResponse(BaseModel):
    id: str = Field(description="Identifies this answer (as Jina's, Cohere's and vLLM's rerank answers do).")
    model: str
    usage: Usage
    results: list[RerankResult] = Field(description="Best first; top_n of them when top_n is given.")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "jinaai"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
