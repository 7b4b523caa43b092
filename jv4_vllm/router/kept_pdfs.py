"""PDFs the router keeps for a caller's later requests, so a long PDF is uploaded once.

The client embeds a PDF in page batches, one request each. Its first request carries the
file with ``"keep": true``; the router keeps the bytes, keyed by their SHA-256 and by the
caller's credentials, and the later batches send ``"pdf": "sha256:<hex>"`` in their place.
The store is bounded in bytes (least recently used first out); a reference it does not hold
(evicted, or kept by another router replica) is a 400 with code ``pdf_not_kept``, which
the client answers by sending the bytes again. Keys never leave the process; a caller can
only name the files it sent.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict

from jv4_vllm.errors import PDF_NOT_KEPT, InvalidRequestError

__all__ = ["KeptPdfs", "is_reference"]

_REFERENCE = re.compile(r"^sha256:([0-9a-f]{64})$")


def is_reference(value: str) -> bool:
    """``sha256:<64 hex digits>``: base64 never holds ':', data URIs and URLs start otherwise."""
    return bool(_REFERENCE.match(value))


class KeptPdfs:
    """A byte-bounded LRU of PDF files, per caller."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._files: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # put() runs in worker threads beside the loop's get()

    @staticmethod
    def caller(authorization: str | None) -> str:
        """Who is asking, as a digest of their credentials (one space for every caller without keys)."""
        return hashlib.sha256((authorization or "").encode("utf-8", "replace")).hexdigest()

    def put(self, caller: str, data: bytes) -> None:
        """Keep ``data`` for ``caller`` (a file larger than the whole store is not kept)."""
        if len(data) > self.max_bytes:
            return
        key = (caller, hashlib.sha256(data).hexdigest())
        with self._lock:
            if key in self._files:
                self._files.move_to_end(key)
                return
            self._files[key] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes:
                _, dropped = self._files.popitem(last=False)
                self._bytes -= len(dropped)

    def get(self, caller: str, reference: str, index: int) -> bytes:
        """The bytes ``reference`` names, or a 400 (code ``pdf_not_kept``) naming ``input[index]``."""
        match = _REFERENCE.match(reference)
        with self._lock:
            data = self._files.get((caller, match.group(1))) if match else None
            if data is not None:
                self._files.move_to_end((caller, match.group(1)))  # type: ignore[union-attr]
        if data is None:
            raise InvalidRequestError(f"input[{index}]: the router does not hold the PDF {reference}; send its "
                                      'bytes (with "keep": true to reference it again)', param=f"input[{index}]",
                                      code=PDF_NOT_KEPT)
        return data
