"""Turn user image inputs into checked :class:`~jv4_vllm.types.ImageInput` values.

Sources: raw bytes, base64 strings, data URIs, http(s) URLs (only when
``LimitsConfig.allow_image_urls`` is on, and never to a non-public address), and, for
the Python client only, local paths and PIL images.

Every file's header is read before anything is sent to vLLM: the byte size, the pixel
count (from the header, before any pixel is decoded: decompression bombs) and the aspect
ratio are checked and the format must be one we accept. What the model sees follows the
reference encoder (:mod:`jv4_vllm.core.image_rules`): an RGB JPEG, PNG or WebP with no
EXIF orientation and one frame goes to vLLM exactly as received, never decoded here;
anything else is decoded, converted by the reference's rule and sent as an RGB PNG.

Errors are :class:`InvalidRequestError` / :class:`PayloadTooLargeError` whose message
and ``param`` name the input (``input[3]``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import os
import re
import socket
from pathlib import Path

import httpx
from PIL import Image, UnidentifiedImageError

from jv4_vllm.config import LimitsConfig
from jv4_vllm.core.image_rules import (
    DEFAULT_MAX_IMAGE_PIXELS,
    MAX_ASPECT_RATIO,
    PASS_THROUGH_MIMES,
    needs_conversion,
    to_rgb,
)
from jv4_vllm.core.types import ImageInput
from jv4_vllm.errors import InvalidRequestError, PayloadTooLargeError

__all__ = ["ALLOWED_FORMATS", "ImageSource", "address_allowed", "decode_base64", "decode_image", "fetch_image_url",
           "has_url_scheme", "load_image", "read_image"]

ImageSource = bytes | bytearray | memoryview | str | os.PathLike[str] | Image.Image

ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_MAX_REDIRECTS = 3


def _invalid(index: int, message: str, code: str | None = None) -> InvalidRequestError:
    return InvalidRequestError.about(index, message, code=code)


def _too_large(index: int, message: str) -> PayloadTooLargeError:
    return PayloadTooLargeError.about(index, message)


def _check_byte_size(size: int, limits: LimitsConfig, index: int) -> None:
    if size > limits.max_image_bytes:
        raise _too_large(index, f"image is larger than {limits.max_image_bytes} bytes")


# --- decoding and normalising -------------------------------------------------------


def decode_image(data: bytes, limits: LimitsConfig, index: int) -> ImageInput:
    """Check encoded image bytes and return what vLLM must get (CPU-bound only when converting)."""
    _check_byte_size(len(data), limits, index)
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
            width, height = image.size
            _check_pixels(width, height, limits, index)
            if not needs_conversion(image, data, limits.image_alpha):
                if image.format == "PNG":
                    image.verify()  # chunk CRCs, no pixels: vLLM embeds a corrupt PNG the reference refuses
                return ImageInput(data=bytes(data), mime=PASS_THROUGH_MIMES[image.format], width=width,
                                  height=height)
            image.load()
            return _png(to_rgb(image, is_file=True, alpha=limits.image_alpha))
    except Image.DecompressionBombError as exc:
        raise _too_large(index, f"image has too many pixels (limit {_pixel_limit(limits)})") from exc
    except UnidentifiedImageError as exc:
        raise _invalid(index, f"not an image in a supported format ({', '.join(ALLOWED_FORMATS)})",
                       "invalid_image") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError) as exc:
        # Pillow reports broken or truncated files with any of these.
        raise _invalid(index, "the image file is broken or truncated", "invalid_image") from exc


def _pixel_limit(limits: LimitsConfig) -> int:
    return limits.max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS


def _check_pixels(width: int, height: int, limits: LimitsConfig, index: int) -> None:
    if width <= 0 or height <= 0:
        raise _invalid(index, f"image has an empty size {width}x{height}", "invalid_image")
    if width * height > _pixel_limit(limits):
        raise _too_large(index, f"image is {width}x{height} pixels; the limit is {_pixel_limit(limits)} pixels")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise _invalid(index, f"image is {width}x{height} pixels; the model takes aspect ratios up to "
                              f"{MAX_ASPECT_RATIO}:1", "invalid_image")


def _png(rgb: Image.Image) -> ImageInput:
    """An RGB image as a fast-compressed PNG (no EXIF: vLLM must not rotate it)."""
    out = io.BytesIO()
    rgb.save(out, format="PNG", compress_level=1)
    return ImageInput(data=out.getvalue(), mime="image/png", width=rgb.width, height=rgb.height)


def _from_pil(image: Image.Image, limits: LimitsConfig, index: int) -> ImageInput:
    """A PIL image as the reference's processor sees it: non-RGB composited onto white."""
    _check_pixels(image.width, image.height, limits, index)
    try:
        return _png(to_rgb(image, is_file=False, alpha=limits.image_alpha))
    except ValueError as exc:  # a mode Pillow cannot convert, e.g. "La"
        raise _invalid(index, f"cannot convert a PIL image of mode {image.mode!r} to RGB", "invalid_image") from exc


# --- text forms: base64 and data URIs -----------------------------------------------


def decode_base64(text: str, max_bytes: int, index: int, what: str = "image") -> bytes:
    """Standard or URL-safe base64 (whitespace and missing padding tolerated) of an input file;
    the decoded size is checked before decoding. Errors name ``input[index]`` and ``what`` it is."""
    compact = "".join(text.split())
    if not compact:
        raise _invalid(index, f"the {what} is an empty string", f"invalid_{what.lower()}")
    if len(compact) * 3 // 4 > max_bytes:
        raise _too_large(index, f"the {what} is larger than {max_bytes} bytes")
    compact += "=" * (-len(compact) % 4)
    altchars = b"-_" if ("-" in compact or "_" in compact) else None
    try:
        return base64.b64decode(compact, altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _invalid(index, f"the {what} is not valid base64 (nor a data URI or URL)", "invalid_base64") from exc


def _from_base64(text: str, limits: LimitsConfig, index: int) -> bytes:
    return decode_base64(text, limits.max_image_bytes, index)


def _from_data_uri(uri: str, limits: LimitsConfig, index: int) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise _invalid(index, "a data URI must look like data:image/<type>;base64,<data>", "invalid_image")
    return _from_base64(payload, limits, index)


def has_url_scheme(text: str) -> bool:
    """``scheme://...``: a URL of any scheme (base64 and data URIs never look like one)."""
    return bool(_URL_RE.match(text))


def _read_path(path: str | os.PathLike[str], limits: LimitsConfig, index: int) -> bytes:
    file = Path(path)
    try:
        _check_byte_size(file.stat().st_size, limits, index)
        return file.read_bytes()
    except OSError as exc:
        raise _invalid(index, f"cannot read image file {str(path)!r}: {exc.strerror or exc}") from exc


def _local_bytes(value: ImageSource, limits: LimitsConfig, index: int, allow_paths: bool) -> bytes:
    """Bytes of any source except URLs and PIL images."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, os.PathLike):
        if not allow_paths:
            raise _invalid(index, "local file paths are not accepted here")
        return _read_path(value, limits, index)
    if isinstance(value, str):
        if value[:5].lower() == "data:":
            return _from_data_uri(value, limits, index)
        if allow_paths and len(value) < 4096 and os.path.isfile(value):
            return _read_path(value, limits, index)
        return _from_base64(value, limits, index)
    raise _invalid(index, f"unsupported image value of type {type(value).__name__}")


def read_image(value: ImageSource, limits: LimitsConfig, index: int, *, allow_paths: bool = False) -> ImageInput:
    """Checked image from bytes, base64, a data URI, a PIL image or (``allow_paths``) a file.

    URLs need the network: use :func:`load_image`.
    """
    if isinstance(value, Image.Image):
        return _from_pil(value, limits, index)
    if isinstance(value, str) and has_url_scheme(value):
        raise _invalid(index, "image URLs are fetched by load_image only")
    return decode_image(_local_bytes(value, limits, index, allow_paths), limits, index)


async def load_image(value: ImageSource, limits: LimitsConfig, index: int, *, allow_paths: bool = False) -> ImageInput:
    """Like :func:`read_image`, and fetches http(s) URLs when the limits allow it.

    Pillow work runs in a worker thread so the event loop stays responsive.
    """
    if isinstance(value, str) and has_url_scheme(value):
        data = await fetch_image_url(value, limits, index)
        return await asyncio.to_thread(decode_image, data, limits, index)
    if isinstance(value, Image.Image):
        return await asyncio.to_thread(_from_pil, value, limits, index)
    data = _local_bytes(value, limits, index, allow_paths)
    return await asyncio.to_thread(decode_image, data, limits, index)


# --- URLs ---------------------------------------------------------------------------

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def address_allowed(address: IPAddress) -> bool:
    """Only public unicast addresses: no loopback, private, link-local, multicast or reserved ones."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # the IPv4 address is what gets connected to
            return address_allowed(address.ipv4_mapped)
        embedded = address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is not None and not address_allowed(embedded):
            return False
    return not (
        address.is_loopback or address.is_private or address.is_link_local or address.is_multicast
        or address.is_reserved or address.is_unspecified or not address.is_global
    )


async def _resolve_checked(host: str, port: int, index: int, what: str) -> str:
    """Resolve ``host`` and return one address, after checking EVERY address it resolves to."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise _invalid(index, f"cannot resolve the {what} URL host {host!r}", "image_fetch_failed") from exc
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not addresses or not all(address_allowed(a) for a in addresses):
        raise _invalid(index, f"the {what} URL points to a forbidden (non-public) address", "forbidden_url")
    return str(addresses[0])


async def fetch_image_url(url: str, limits: LimitsConfig, index: int, *, what: str = "image",
                          max_bytes: int | None = None) -> bytes:
    """GET an image (or the ``what`` a caller names, at most ``max_bytes``: a PDF) over http(s) with the
    address, redirect, size and time limits applied; errors name ``what``."""
    if not limits.allow_image_urls:
        raise _invalid(index, f"{what} URLs are disabled on this server; send base64 or a data URI", "forbidden_url")
    try:
        async with asyncio.timeout(limits.image_url_timeout_s):
            return await _fetch(url, limits, index, what, limits.max_image_bytes if max_bytes is None else max_bytes)
    except TimeoutError as exc:
        raise _invalid(index, f"fetching the {what} URL took longer than {limits.image_url_timeout_s} s",
                       "image_fetch_failed") from exc


async def _fetch(url: str, limits: LimitsConfig, index: int, what: str, max_bytes: int) -> bytes:
    timeout = httpx.Timeout(limits.image_url_timeout_s)
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        for _ in range(_MAX_REDIRECTS + 1):
            try:
                target = httpx.URL(url)
            except httpx.InvalidURL as exc:
                raise _invalid(index, f"the {what} URL is malformed", "invalid_url") from exc
            if target.scheme not in ("http", "https") or not target.raw_host:
                raise _invalid(index, f"{what} URLs must be http(s)://host/...", "invalid_url")
            if target.userinfo:
                raise _invalid(index, f"{what} URLs must not carry credentials", "invalid_url")
            host = target.raw_host.decode("ascii")
            port = target.port or (443 if target.scheme == "https" else 80)
            address = await _resolve_checked(host, port, index, what)
            # Connect to the address just checked (no second lookup); TLS still checks the real name.
            request = client.build_request(
                "GET", target.copy_with(host=address),
                headers={"Host": host if target.port is None else f"{host}:{port}", "Accept-Encoding": "identity"},
                extensions={"sni_hostname": host},
            )
            try:
                response = await client.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise _invalid(index, f"fetching the {what} URL failed ({type(exc).__name__})",
                               "image_fetch_failed") from exc
            try:
                if response.is_redirect and "location" in response.headers:
                    url = str(target.join(response.headers["location"]))
                    continue
                if response.status_code != 200:
                    raise _invalid(index, f"fetching the {what} URL answered HTTP {response.status_code}",
                                   "image_fetch_failed")
                return await _read_capped(response, index, what, max_bytes)
            finally:
                await response.aclose()
    raise _invalid(index, f"the {what} URL redirected more than {_MAX_REDIRECTS} times", "image_fetch_failed")


async def _read_capped(response: httpx.Response, index: int, what: str, max_bytes: int) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit():
        _check_url_bytes(int(declared), index, what, max_bytes)
    body = bytearray()
    try:
        async for chunk in response.aiter_raw():
            body += chunk
            _check_url_bytes(len(body), index, what, max_bytes)
    except httpx.HTTPError as exc:
        raise _invalid(index, f"reading the {what} URL failed ({type(exc).__name__})", "image_fetch_failed") from exc
    return bytes(body)


def _check_url_bytes(size: int, index: int, what: str, max_bytes: int) -> None:
    if size > max_bytes:
        raise _too_large(index, f"{what} is larger than {max_bytes} bytes")
