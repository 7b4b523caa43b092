"""One error tree for the whole package, and its one mapping to HTTP.

    Jv4Error                      500 server_error (never shown with internals)
    ├── InvalidRequestError       400 invalid_request_error  (bad field or input; names it)
    │   └── InputTooLongError     400 code=input_too_long
    ├── AuthenticationError       401 authentication_error
    ├── ModelNotFoundError        404 code=model_not_found
    ├── PayloadTooLargeError      413 invalid_request_error
    ├── OverloadedError           429 rate_limit_error (Retry-After)
    ├── BackendError              502 backend_error (a vLLM replica, or to the client the service, failed)
    ├── BackendUnavailableError   503 service_unavailable (Retry-After)
    │   └── ServiceUnreachableError   client side: no HTTP answer at all (refused, reset, DNS, TLS)
    └── BackendTimeoutError       504 timeout (client side too: no answer within the client's timeout)

The router renders any of these as ``{"error": {message, type, param, code}, "detail"}``; the
client turns such a body back into the same class with :func:`error_from_body`, and any other
answer (an HTML page from a proxy, plain text) with :func:`error_from_response`, so a caller
catches one tree whatever failed.

An error about particular inputs carries their indices as data (:meth:`Jv4Error.about`): its
message and param name them (``input[3]: ...``) when read, so a layer that knows them by
another name (``documents[1]``, a PDF's input rather than its page) relabels them with
:meth:`Jv4Error.relabel`, without touching the text.
"""

from __future__ import annotations

import email.utils
import json
import math
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any, ClassVar, Self

__all__ = [
    "AuthenticationError",
    "BackendError",
    "BackendTimeoutError",
    "BackendUnavailableError",
    "InputTooLongError",
    "InvalidRequestError",
    "Jv4Error",
    "ModelNotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "ServiceUnreachableError",
    "PDF_NOT_KEPT",
    "error_from_body",
    "error_from_response",
    "retry_after_seconds",
]

def input_name(index: int) -> str:
    """How the HTTP API names an input by default: ``input[3]``."""
    return f"input[{index}]"


class Jv4Error(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        inputs: Sequence[int] = (),
        suffix: str = "",
    ) -> None:
        super().__init__(message)
        self.inputs = tuple(inputs)  # the inputs the error is about; the message starts with their names
        self._text = message
        self._suffix = suffix
        self._param = param
        self._name: Callable[[int], str] = input_name
        self.code = code or self.default_code
        self.retry_after = retry_after

    @classmethod
    def about(cls, inputs: int | Sequence[int], text: str, *, suffix: str = "", sep: str = ": ",
              **kwargs: Any) -> Self:
        """An error about ``inputs`` (one index or several): ``input[3]: text``, param ``input[3]``;
        ``suffix`` points inside the first one (``.pages``: ``input[3].pages: text``)."""
        indices = (inputs,) if isinstance(inputs, int) else tuple(inputs)
        return cls(sep + text, inputs=indices, suffix=suffix, **kwargs)

    def relabel(self, name: Callable[[int], str]) -> Self:
        """Name this error's inputs with ``name(index)`` from now on (``documents[i]``, ``query``)."""
        self._name = name
        return self

    def _label(self) -> str:
        return ", ".join(self._name(i) for i in self.inputs) + self._suffix if self.inputs else ""

    @property
    def message(self) -> str:
        return self._label() + self._text

    @message.setter
    def message(self, value: str) -> None:
        label = self._label()
        if label and value.startswith(label):
            self._text = value[len(label):]
        else:
            self._text, self.inputs = value, ()

    @property
    def param(self) -> str | None:
        if self._param is None and self.inputs:
            return self._name(self.inputs[0]) + self._suffix
        return self._param

    @param.setter
    def param(self, value: str | None) -> None:
        self._param = value

    def __str__(self) -> str:
        return self.message

    def to_body(self) -> dict[str, Any]:
        """OpenAI's error object, plus the message as ``detail`` (where Jina's client libraries read it)."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code},
                "detail": self.message}


class InvalidRequestError(Jv4Error):
    status = 400
    type = "invalid_request_error"


class InputTooLongError(InvalidRequestError):
    default_code = "input_too_long"


class AuthenticationError(Jv4Error):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class ModelNotFoundError(Jv4Error):
    status = 404
    type = "invalid_request_error"
    default_code = "model_not_found"


class PayloadTooLargeError(Jv4Error):
    status = 413
    type = "invalid_request_error"
    default_code = "payload_too_large"


class OverloadedError(Jv4Error):
    status = 429
    type = "rate_limit_error"
    default_code = "overloaded"


class BackendError(Jv4Error):
    status = 502
    type = "backend_error"


class BackendUnavailableError(Jv4Error):
    status = 503
    type = "service_unavailable"
    default_code = "no_healthy_backend"


class ServiceUnreachableError(BackendUnavailableError):
    """Raised by the client only: the service gave no HTTP answer (the connection failed or broke)."""

    default_code = "service_unreachable"


class BackendTimeoutError(Jv4Error):
    status = 504
    type = "timeout"


PDF_NOT_KEPT = "pdf_not_kept"  # 400 code: a sha256: PDF reference the router does not hold (send the bytes)

_BY_CODE: dict[str, type[Jv4Error]] = {
    "input_too_long": InputTooLongError,
    "model_not_found": ModelNotFoundError,
}
_BY_STATUS: dict[int, type[Jv4Error]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    404: ModelNotFoundError,
    413: PayloadTooLargeError,
    422: InvalidRequestError,
    429: OverloadedError,
    502: BackendError,
    503: BackendUnavailableError,
    504: BackendTimeoutError,
}


def error_from_body(status: int, body: Any, retry_after: float | None = None) -> Jv4Error:
    """Rebuild the exception a server rendered (OpenAI error body), for the client side."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        error = {"message": str(body)[:500] or f"HTTP {status}"}
    code = error.get("code")
    cls = _BY_CODE.get(code or "") or _BY_STATUS.get(status) or (
        InvalidRequestError if 400 <= status < 500 else Jv4Error)
    return cls(str(error.get("message", "")), param=error.get("param"), code=code, retry_after=retry_after)


def error_from_response(status: int, content: bytes, retry_after: str | None = None) -> Jv4Error:
    """The exception for any HTTP error answer: our JSON body, another JSON, or text and HTML."""
    try:
        body: Any = json.loads(content) if content else f"HTTP {status}"
    except ValueError:  # not JSON, or not UTF-8
        text = " ".join(content[:500].decode("utf-8", "replace").split())
        body = f"HTTP {status}: {text}"
    return error_from_body(status, body, retry_after_seconds(retry_after))


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """A ``Retry-After`` header as seconds from now: delta-seconds or an HTTP date; None when unreadable."""
    if not value or not value.strip():
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # an HTTP date is GMT
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - (now or datetime.now(timezone.utc))).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None
