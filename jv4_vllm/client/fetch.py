"""The caller's own URLs, fetched by the client for its caller.

The router refuses URLs that resolve to private or loopback addresses: a server must not
reach into its own network on a stranger's behalf. The client is on its user's side of
that line: like a browser or ``curl`` it fetches what its user names, on the user's
network and through the user's proxies, so an image on the user's intranet embeds. The
limits that protect the client itself still hold: the body is read no further than the
byte cap, and the image's pixels are capped when it is decoded.
"""

from __future__ import annotations

import httpx

from jv4_vllm.errors import InvalidRequestError, PayloadTooLargeError

__all__ = ["fetch_own_url", "is_http_url"]


def is_http_url(value: object) -> bool:
    """An http(s) URL, which the client fetches itself (other schemes are refused where they are read)."""
    return isinstance(value, str) and value[:8].lower().startswith(("http://", "https://"))


async def fetch_own_url(url: str, *, max_bytes: int, timeout_s: float, index: int, what: str = "image") -> bytes:
    """GET ``url`` following redirects; a failure is a 4xx error naming ``input[index]``."""
    too_large = PayloadTooLargeError.about(index, f"the {what} at the URL is larger than {max_bytes} bytes")
    try:
        async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=True) as http:
            async with http.stream("GET", url) as response:
                if response.status_code != 200:
                    raise InvalidRequestError.about(index, f"fetching the {what} URL answered HTTP "
                                                    f"{response.status_code}", code="image_fetch_failed")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    raise too_large
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > max_bytes:
                        raise too_large
                return bytes(body)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise InvalidRequestError.about(index, f"fetching the {what} URL failed ({type(exc).__name__}: {exc})",
                                        code="image_fetch_failed") from exc
