"""The router's one exception handler: every failure leaves as an OpenAI error body.

``{"error": {"message", "type", "param", "code"}, "detail": message}`` with the status of the
:mod:`jv4_vllm.errors` class and ``Retry-After`` when the error carries one. Request
validation failures become 400s naming the field path (``input[3].image``). Anything
unexpected is a generic 500 "internal error"; its details go to the log only.

A 5xx that a backend caused (502) or nobody expected (500) never shows its text to the client:
vLLM's raw message and replica addresses go to the log under the request id, and the client
gets a stable message naming the input and that id (also in ``request_id`` and the
``X-Request-ID`` header). 4xx messages, including vLLM's own 4xx about the request, are kept.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from jv4_vllm.core.replicas import INPUT_FAILED
from jv4_vllm.core.request_id import current_request_id
from jv4_vllm.errors import BackendError, InvalidRequestError, Jv4Error
from jv4_vllm.router.protocol import field_path

__all__ = ["as_jv4_error", "error_response", "install_error_handler", "public_error"]

log = logging.getLogger(__name__)


def public_error(error: Jv4Error, request_id: str) -> Jv4Error:
    """What the client may see of ``error``: 500s and 502s lose their text, keep param and code."""
    if error.status not in (500, 502):
        return error
    if not isinstance(error, BackendError):
        return Jv4Error(f"internal error (request id {request_id})", code=error.code)
    where = f"{error.param}: " if error.param else ""
    if error.code == INPUT_FAILED:
        message = (f"{where}the model failed on this input on every replica it was sent to; sending it again "
                   f"will fail the same way (request id {request_id})")
    else:
        message = f"{where}the backend failed; retry later (request id {request_id})"
    return BackendError(message, param=error.param, code=error.code)


def error_response(error: Jv4Error) -> Response:
    request_id = current_request_id()
    body = public_error(error, request_id).to_body()
    body["error"]["request_id"] = request_id
    headers = {"Retry-After": str(max(1, math.ceil(error.retry_after)))} if error.retry_after is not None else None
    return Response(orjson.dumps(body), status_code=error.status, headers=headers, media_type="application/json")


def _validation_error(exc: RequestValidationError) -> InvalidRequestError:
    """The first problem, phrased for the client, with ``param`` as a field path."""
    errors = exc.errors()
    if not errors:
        return InvalidRequestError("the request is invalid")
    first: dict[str, Any] = errors[0]
    loc = [part for part in first.get("loc", ()) if part != "body"]
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return InvalidRequestError(f"the request body is not valid JSON ({detail})" if detail
                                   else "the request body is not valid JSON", code="invalid_json")
    param = field_path(loc)
    if kind == "string_unicode":  # pydantic cannot read a field NAME holding a lone surrogate
        where = f"{param}: " if param else "the request body: "
        return InvalidRequestError(f"{where}a field name is not valid Unicode (lone surrogate)", param=param)
    if param is None:
        if isinstance(first.get("input"), bytes):  # FastAPI parses JSON only when the content type says so
            return InvalidRequestError("the request body must be a JSON object sent with "
                                       "Content-Type: application/json")
        message = ("the request body is required: a JSON object" if kind == "missing"
                   else "the request body must be a JSON object")
        return InvalidRequestError(message)
    if kind == "extra_forbidden":
        return InvalidRequestError(f"unknown field {param!r}", param=param)
    if kind == "missing":
        return InvalidRequestError(f"{param} is required", param=param)
    return InvalidRequestError(f"{param}: {first.get('msg', 'invalid value')}", param=param)


def as_jv4_error(exc: Exception) -> Jv4Error | None:
    """The error tree member for ``exc``; None for framework HTTP errors rendered as they are."""
    if isinstance(exc, Jv4Error):
        return exc
    if isinstance(exc, RequestValidationError):
        return _validation_error(exc)
    if isinstance(exc, HTTPException):
        return exc.__cause__ if isinstance(exc.__cause__, Jv4Error) else None
    return None


async def handle_error(request: Request, exc: Exception) -> Response:
    error = as_jv4_error(exc)
    if error is None and isinstance(exc, HTTPException):  # unknown route, wrong method
        body = {"error": {"message": str(exc.detail), "type": "invalid_request_error", "param": None, "code": None,
                          "request_id": current_request_id()},
                "detail": str(exc.detail)}
        return Response(orjson.dumps(body), status_code=exc.status_code, headers=exc.headers,
                        media_type="application/json")
    if error is None:
        log.error("request %s: unhandled error on %s %s", current_request_id(), request.method, request.url.path,
                  exc_info=exc)
        error = Jv4Error("internal error")
    elif error.status >= 500:
        log.warning("request %s: %s %s -> %d: %s", current_request_id(), request.method, request.url.path,
                    error.status, error.message)
    request.state.error_type = error.type
    return error_response(error)


def install_error_handler(app: FastAPI) -> None:
    """Route every exception kind to :func:`handle_error`."""
    for kind in (Jv4Error, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(kind, handle_error)
