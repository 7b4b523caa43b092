"""The id of the request being served, for log lines far from the HTTP layer.

The router sets it per request (a caller's ``X-Request-ID`` or a fresh one); asyncio tasks and
worker threads started while serving inherit it, so a replica's failure is logged under the id
the client was given.
"""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar

__all__ = ["REQUEST_ID", "accept_request_id", "current_request_id"]

REQUEST_ID: ContextVar[str] = ContextVar("jv4_request_id", default="-")
_ACCEPTED = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")  # what may be echoed into a header and a log line


def accept_request_id(offered: str | None) -> str:
    """The caller's id when it is a short, plain token; a fresh one otherwise."""
    if offered and _ACCEPTED.match(offered):
        return offered
    return uuid.uuid4().hex


def current_request_id() -> str:
    return REQUEST_ID.get()
