"""Three bounded pools for reading inputs, so one slow kind of work never stalls the others.

- URL downloads wait on the network: ``limits.max_url_fetches`` at once, each within
  ``limits.image_url_timeout_s``.
- Image decodes and checks use the CPU: a thread pool of ``limits.image_decode_workers``
  (one per core by default).
- PDF opening and rendering: their own thread pool (PDFium draws one page at a time per
  process), each document within ``limits.pdf_render_timeout_s``.

Work waiting in a pool is dropped when its request is cancelled (the client left), and a PDF
being rendered stops at its next page, so abandoned work never reaches vLLM.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from jv4_vllm.config import LimitsConfig

__all__ = ["InputPools"]

T = TypeVar("T")


class InputPools:
    """The router's pools for URL fetches, image decodes and PDF renders (one set per app)."""

    def __init__(self, limits: LimitsConfig) -> None:
        self.fetches = asyncio.Semaphore(limits.max_url_fetches)
        self._decodes = ThreadPoolExecutor(limits.image_decode_workers or os.cpu_count() or 1,
                                           thread_name_prefix="jv4-decode")
        self._renders = ThreadPoolExecutor(limits.pdf_render_workers, thread_name_prefix="jv4-pdf")

    async def decode(self, job: Callable[..., T], *args: object) -> T:
        """``job(*args)`` in the decode pool."""
        return await _run(self._decodes, functools.partial(job, *args))

    async def render(self, job: Callable[..., T], *args: object, cancel: threading.Event | None = None) -> T:
        """``job(*args)`` in the PDF pool; ``cancel`` is set if the request is cancelled meanwhile."""
        try:
            return await _run(self._renders, functools.partial(job, *args))
        except asyncio.CancelledError:
            if cancel is not None:
                cancel.set()
            raise

    def close(self) -> None:
        self._decodes.shutdown(wait=False, cancel_futures=True)
        self._renders.shutdown(wait=False, cancel_futures=True)


async def _run(pool: ThreadPoolExecutor, job: Callable[[], T]) -> T:
    context = contextvars.copy_context()  # the request id follows the work into the thread
    return await asyncio.get_running_loop().run_in_executor(pool, context.run, job)
