"""PDF inputs: each page rendered to an image, which then takes the path of any image input.

A PDF arrives as bytes, base64, a data URI or (only when the server allows URLs) an http(s)
URL, with an optional page selection such as ``"1-3,7"``. It is opened with PDFium
(pypdfium2) and checked against the limits before any page is drawn: its byte size, the
pages per request, and the pixels of every page at ``limits.render_dpi`` (a page the size of
a wall is refused, not rendered). Pages are then rendered one at a time and handed to
:func:`jv4_vllm.core.images.read_image`, so a page image is checked and normalised exactly
like an uploaded one.

PDFium is not thread-safe, not even across documents: every PDFium call here holds one
process-wide lock, and all of it runs in worker threads (:func:`load_pdf`,
:func:`render_pdf`), never on the event loop. Errors name the input (``input[3]``,
``input[3].pages``) like the image errors do.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c

from jv4_vllm.config import LimitsConfig
from jv4_vllm.core.image_rules import DEFAULT_MAX_IMAGE_PIXELS
from jv4_vllm.core.images import decode_base64, fetch_image_url, has_url_scheme, read_image
from jv4_vllm.core.types import ImageInput
from jv4_vllm.errors import InvalidRequestError, PayloadTooLargeError

__all__ = [
    "PageSelection",
    "PdfInput",
    "PdfPlan",
    "PdfSource",
    "RenderedPdf",
    "check_page_budget",
    "fetch_pdf",
    "format_pages",
    "is_pdf_url",
    "load_pdf",
    "parse_pages",
    "plan_pdf",
    "read_pdf_bytes",
    "render_pdf",
    "render_plan",
]

PdfSource = bytes | bytearray | memoryview | str | os.PathLike[str]
PageSelection = str | Sequence[int] | None

POINTS_PER_INCH = 72.0
_RANGE_RE = re.compile(r"^(\d*)\s*-\s*(\d*)$")
_PASSWORD_ERRORS = {4, 6}  # FPDF_ERR_PASSWORD, FPDF_ERR_SECURITY
_PDFIUM = threading.Lock()  # PDFium must never run in two threads at once


@dataclass(frozen=True, slots=True)
class PdfInput:
    """A PDF as a client holds it: the file's bytes and an optional page selection."""

    data: bytes
    pages: PageSelection = None


@dataclass(frozen=True, slots=True)
class PdfPlan:
    """A PDF that opened and passed the checks: the pages to render, 1-based and ascending."""

    data: bytes
    pages: tuple[int, ...]
    index: int


@dataclass(frozen=True, slots=True)
class RenderedPdf:
    """Page numbers and their images, in page order."""

    pages: tuple[int, ...]
    images: tuple[ImageInput, ...]


def _invalid(index: int, message: str, code: str = "invalid_pdf", suffix: str = "") -> InvalidRequestError:
    return InvalidRequestError.about(index, message, code=code, suffix=suffix)


def _too_large(index: int, message: str, code: str = "payload_too_large") -> PayloadTooLargeError:
    return PayloadTooLargeError.about(index, message, code=code)


# --- page selections --------------------------------------------------------------------


def parse_pages(selection: PageSelection, page_count: int, index: int) -> tuple[int, ...]:
    """``"1-3,7"`` (also ``"5-"``, ``"-2"``, or a list of numbers) -> ascending unique 1-based pages."""
    if selection is None:
        return tuple(range(1, page_count + 1))
    param = ".pages"  # errors point at the input's page selection
    if isinstance(selection, str) and not selection.strip():
        raise _invalid(index, "the page selection is empty; leave it out for every page", "invalid_pages", param)
    parts = [str(p) for p in selection] if not isinstance(selection, str) else selection.split(",")
    chosen: set[int] = set()
    for raw in parts:
        part = raw.strip()
        if part.isdigit():
            first = last = int(part)
        else:
            match = _RANGE_RE.match(part)
            if match is None or not (match.group(1) or match.group(2)):
                raise _invalid(index, f"{raw.strip()!r} is not a page or a range; write pages like \"1-3,7\"",
                               "invalid_pages", param)
            first = int(match.group(1) or 1)
            last = int(match.group(2) or page_count)
        if first < 1:
            raise _invalid(index, "pages are numbered from 1", "invalid_pages", param)
        if first > last:
            raise _invalid(index, f"the range {part!r} runs backwards", "invalid_pages", param)
        if last > page_count:
            raise _invalid(index, f"page {last} is past the end: the PDF has {page_count} page(s)",
                           "invalid_pages", param)
        chosen.update(range(first, last + 1))
    if not chosen:
        raise _invalid(index, "the page selection is empty", "invalid_pages", param)
    return tuple(sorted(chosen))


def format_pages(pages: Sequence[int]) -> str:
    """Ascending page numbers as a compact selection: (1, 2, 3, 7) -> "1-3,7"."""
    parts: list[str] = []
    ordered = sorted(set(pages))
    start = 0
    for i in range(1, len(ordered) + 1):
        if i == len(ordered) or ordered[i] != ordered[i - 1] + 1:
            first, last = ordered[start], ordered[i - 1]
            parts.append(str(first) if first == last else f"{first}-{last}")
            start = i
    return ",".join(parts)


def check_page_budget(plans: Sequence[PdfPlan], limits: LimitsConfig) -> None:
    """413 naming the PDF at which the request's pages pass ``max_pdf_pages_per_request``."""
    total = 0
    for plan in plans:
        total += len(plan.pages)
        if total > limits.max_pdf_pages_per_request:
            raise _too_large(plan.index, f"this request's PDFs select {total}+ pages; the limit is "
                             f"{limits.max_pdf_pages_per_request} pages per request (send fewer pages)",
                             "too_many_pages")


# --- bytes ------------------------------------------------------------------------------


def _check_bytes(size: int, limits: LimitsConfig, index: int) -> None:
    if size > limits.max_pdf_bytes:
        raise _too_large(index, f"the PDF is larger than {limits.max_pdf_bytes} bytes")


def _from_base64(text: str, limits: LimitsConfig, index: int) -> bytes:
    return decode_base64(text, limits.max_pdf_bytes, index, what="PDF")


def read_pdf_bytes(value: PdfSource, limits: LimitsConfig, index: int, allow_paths: bool = False) -> bytes:
    """The file's bytes from raw bytes, base64, a data URI or (``allow_paths``) a local file."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, os.PathLike) or (allow_paths and isinstance(value, str) and len(value) < 4096
                                            and os.path.isfile(value)):
        if not allow_paths:
            raise _invalid(index, "local file paths are not accepted here")
        try:
            _check_bytes(Path(value).stat().st_size, limits, index)
            data = Path(value).read_bytes()
        except OSError as exc:
            raise _invalid(index, f"cannot read PDF file {str(value)!r}: {exc.strerror or exc}") from exc
    elif isinstance(value, str):
        if value[:5].lower() == "data:":
            header, sep, payload = value.partition(",")
            if not sep or not header.lower().endswith(";base64"):
                raise _invalid(index, "a data URI must look like data:application/pdf;base64,<data>")
            data = _from_base64(payload, limits, index)
        else:
            data = _from_base64(value, limits, index)
    else:
        raise _invalid(index, f"unsupported PDF value of type {type(value).__name__}")
    _check_bytes(len(data), limits, index)
    if not data:
        raise _invalid(index, "the PDF is empty (0 bytes)")
    return data


def is_pdf_url(value: PdfSource) -> bool:
    return isinstance(value, str) and has_url_scheme(value)


async def fetch_pdf(url: str, limits: LimitsConfig, index: int) -> bytes:
    """An http(s) PDF through the image fetcher: same address checks, redirects and time limit."""
    return await fetch_image_url(url, limits, index, what="PDF", max_bytes=limits.max_pdf_bytes)


# --- opening, checking and rendering ----------------------------------------------------


def _open(data: bytes, index: int) -> pdfium.PdfDocument:
    """Open (the caller holds the lock); every failure is a 400 naming the input.

    PDFium's last-error code is process state that a failed load does not always set (a
    document without a page tree fails with no code), so it is first set to "file not found",
    which no in-memory load reports: a failure that leaves it there had no page tree.
    """
    if pdfium_c.FPDF_LoadDocument(b"", None):  # pragma: no cover - an empty path never opens
        raise RuntimeError("PDFium opened an empty path")
    try:
        return pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        code = getattr(exc, "err_code", None)
        if code in _PASSWORD_ERRORS:
            raise _invalid(index, "the PDF is encrypted (password protected); send an unprotected PDF",
                           "encrypted_pdf") from None
        if code == pdfium_c.FPDF_ERR_FILE:
            raise _invalid(index, "the PDF has no pages", "empty_pdf") from None
        raise _invalid(index, "not a readable PDF (malformed or truncated)") from None


def _page_pixels(width_pt: float, height_pt: float, dpi: float) -> tuple[int, int]:
    scale = dpi / POINTS_PER_INCH
    return math.ceil(width_pt * scale), math.ceil(height_pt * scale)


def plan_pdf(data: bytes, selection: PageSelection, limits: LimitsConfig, index: int) -> PdfPlan:
    """Open ``data``, select pages and check every limit; draws nothing (CPU-bound, blocking)."""
    _check_bytes(len(data), limits, index)
    pixel_limit = limits.max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS  # checked before anything is drawn
    with _PDFIUM:
        document = _open(data, index)
        try:
            count = len(document)
            if count == 0:
                raise _invalid(index, "the PDF has no pages", "empty_pdf")
            pages = parse_pages(selection, count, index)
            if len(pages) > limits.max_pdf_pages_per_request:
                raise _too_large(index, f"{len(pages)} pages selected; the limit is "
                                 f"{limits.max_pdf_pages_per_request} pages per request", "too_many_pages")
            for number in pages:
                width, height = _page_pixels(*document.get_page_size(number - 1), limits.render_dpi)
                if width <= 0 or height <= 0:
                    raise _invalid(index, f"page {number} has an empty size")
                if width * height > pixel_limit:
                    raise _too_large(index, f"page {number} is {width}x{height} pixels at {limits.render_dpi:g} "
                                     f"dpi; the limit is {pixel_limit} pixels per page")
        finally:
            document.close()
    return PdfPlan(data=data, pages=pages, index=index)


def render_plan(plan: PdfPlan, limits: LimitsConfig, cancel: threading.Event | None = None) -> RenderedPdf:
    """Render the planned pages at ``render_dpi``, one at a time (CPU-bound, blocking).

    Between pages it stops when ``cancel`` is set (the request is gone), and refuses the document
    once its rendering has taken longer than ``limits.pdf_render_timeout_s``.
    """
    scale = limits.render_dpi / POINTS_PER_INCH
    images: list[ImageInput] = []
    started = time.monotonic()
    with _PDFIUM:
        document = _open(plan.data, plan.index)
    try:
        for number in plan.pages:
            if cancel is not None and cancel.is_set():
                raise _invalid(plan.index, "the request was cancelled", "cancelled")
            if time.monotonic() - started > limits.pdf_render_timeout_s:
                raise _too_large(plan.index, f"rendering the PDF took longer than {limits.pdf_render_timeout_s:g} s "
                                 f"(limits.pdf_render_timeout_s) before page {number}: send fewer pages or a "
                                 "lower-resolution document", "pdf_render_timeout")
            with _PDFIUM:  # released between pages so other requests' PDFs interleave
                page = document[number - 1]
                try:
                    bitmap = page.render(scale=scale)
                    picture = bitmap.to_pil().copy()  # the bitmap's memory belongs to PDFium
                    bitmap.close()
                except pdfium.PdfiumError as exc:
                    raise _invalid(plan.index, f"page {number} cannot be rendered") from exc
                finally:
                    page.close()
            images.append(read_image(picture.convert("RGB"), limits, plan.index))
    finally:
        with _PDFIUM:
            document.close()
    return RenderedPdf(pages=plan.pages, images=tuple(images))


async def load_pdf(value: PdfSource, selection: PageSelection, limits: LimitsConfig, index: int, *,
                   allow_paths: bool = False) -> PdfPlan:
    """Read (or fetch) a PDF and plan it, off the event loop. URLs only when ``allow_image_urls``."""
    if isinstance(value, str) and has_url_scheme(value):
        data = await fetch_pdf(value, limits, index)
        return await asyncio.to_thread(plan_pdf, data, selection, limits, index)

    def read_and_plan() -> PdfPlan:
        return plan_pdf(read_pdf_bytes(value, limits, index, allow_paths), selection, limits, index)

    return await asyncio.to_thread(read_and_plan)


async def render_pdf(plan: PdfPlan, limits: LimitsConfig) -> RenderedPdf:
    """:func:`render_plan` in a worker thread."""
    return await asyncio.to_thread(render_plan, plan, limits)
