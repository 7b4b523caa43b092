"""images.py: every source, every check, and the URL fetcher against loopback servers."""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from images_util import make_image, png_bytes
from jv4_vllm.core import images
from jv4_vllm.config import LimitsConfig
from jv4_vllm.errors import InvalidRequestError, PayloadTooLargeError
from jv4_vllm.core.images import address_allowed, decode_image, load_image, read_image
from PIL import Image

LIMITS = LimitsConfig()


def encoded(image: Image.Image, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with one tiny IDAT: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


# --- pass-through and normalisation ---------------------------------------------------

@pytest.mark.parametrize("fmt,mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_rgb_jpeg_png_webp_pass_through_unchanged(fmt: str, mime: str) -> None:
    data = encoded(make_image(40, 30), fmt)
    image = decode_image(data, LIMITS, 0)
    assert (image.data, image.mime, image.width, image.height) == (data, mime, 40, 30)


@pytest.mark.parametrize("source", [
    lambda: encoded(make_image(20, 10), "BMP"),
    lambda: encoded(make_image(20, 10), "GIF"),
    lambda: encoded(make_image(20, 10), "TIFF"),
    lambda: encoded(make_image(20, 10).convert("L"), "JPEG"),
    lambda: encoded(make_image(20, 10).convert("CMYK"), "JPEG"),
    lambda: encoded(make_image(20, 10).convert("P"), "PNG"),
])
def test_other_formats_and_modes_become_rgb_png(source: Callable[[], bytes]) -> None:
    image = decode_image(source(), LIMITS, 0)
    out = decoded(image.data)
    assert (image.mime, out.format, out.mode, out.size, image.width, image.height) == \
        ("image/png", "PNG", "RGB", (20, 10), 20, 10)


def test_transparency_is_dropped_as_the_reference_does_or_composited_onto_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((1, 1), (0, 0, 255, 255))
    dropped = decoded(decode_image(encoded(rgba, "PNG"), LIMITS, 0).data)
    assert dropped.mode == "RGB"
    assert dropped.getpixel((0, 0)) == (255, 0, 0)  # the stored colour of a transparent pixel
    assert dropped.getpixel((1, 1)) == (0, 0, 255)
    white = decoded(decode_image(encoded(rgba, "PNG"), LimitsConfig(image_alpha="white"), 0).data)
    assert white.getpixel((0, 0)) == (255, 255, 255)
    assert white.getpixel((1, 1)) == (0, 0, 255)


def test_animation_keeps_the_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 255, 0))]
    data = encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    out = decoded(decode_image(data, LIMITS, 0).data)
    assert out.format == "PNG" and getattr(out, "n_frames", 1) == 1
    assert out.getpixel((4, 4)) == (255, 0, 0)


# --- every source ---------------------------------------------------------------------

def test_base64_data_uri_bytes_path_and_pil_give_the_same_pixels(tmp_path: Path) -> None:
    picture = make_image(24, 16)
    data = png_bytes(picture)
    text = base64.b64encode(data).decode()
    path = tmp_path / "picture.png"
    path.write_bytes(data)
    sources = [data, bytearray(data), text, f"data:image/png;base64,{text}", "\n".join([text[:10], text[10:]]),
               base64.urlsafe_b64encode(data).decode().rstrip("=")]
    results = [read_image(source, LIMITS, 0) for source in sources]
    results += [read_image(path, LIMITS, 0, allow_paths=True), read_image(str(path), LIMITS, 0, allow_paths=True),
                read_image(picture, LIMITS, 0)]
    for result in results:
        assert (result.width, result.height) == (24, 16)
        assert decoded(result.data).tobytes() == picture.tobytes()


def test_paths_are_refused_unless_allowed(tmp_path: Path) -> None:
    path = tmp_path / "picture.png"
    path.write_bytes(png_bytes(make_image(8, 8)))
    with pytest.raises(InvalidRequestError, match=r"input\[2\]: local file paths"):
        read_image(path, LIMITS, 2)
    with pytest.raises(InvalidRequestError, match="not valid base64"):  # a string is never read as a path
        read_image(str(path), LIMITS, 2)


async def test_async_loader_matches_the_sync_one() -> None:
    data = encoded(make_image(30, 20).convert("RGBA"), "PNG")
    assert await load_image(data, LIMITS, 0) == read_image(data, LIMITS, 0)
    assert await load_image(make_image(30, 20), LIMITS, 0) == read_image(make_image(30, 20), LIMITS, 0)


# --- rejections, each naming the input ------------------------------------------------

@pytest.mark.parametrize("value,error,pattern", [
    pytest.param(b"hello, not an image", InvalidRequestError, "not an image in a supported format", id="text"),
    pytest.param(png_bytes(make_image(32, 32))[:200], InvalidRequestError, "broken or truncated", id="cut-png"),
    pytest.param(encoded(make_image(64, 64), "JPEG")[:300], InvalidRequestError, "broken or truncated",
                 id="cut-jpeg"),
    pytest.param(b"GIF89a" + b"\0" * 10, InvalidRequestError, "broken or truncated|not an image", id="bad-gif"),
    pytest.param(encoded(make_image(8, 8), "ICO"), InvalidRequestError, "supported format", id="ico"),
    pytest.param("not*base64!", InvalidRequestError, "not valid base64", id="bad-base64"),
    pytest.param("", InvalidRequestError, "empty string", id="empty"),
    pytest.param("data:image/png,rawbytes", InvalidRequestError, "data URI", id="data-uri-not-base64"),
    pytest.param("data:image/png;base64,***", InvalidRequestError, "not valid base64", id="data-uri-bad-base64"),
    pytest.param(png_header_only(100_000, 100_000), PayloadTooLargeError, "pixels", id="bomb-100k"),
    pytest.param(png_header_only(7000, 7000), PayloadTooLargeError, "7000x7000 pixels", id="bomb-7k"),
    pytest.param(png_header_only(0, 5), InvalidRequestError, "not an image|broken|empty size", id="zero-width"),
    pytest.param(12345, InvalidRequestError, "unsupported image value", id="int"),
    pytest.param("https://example.com/a.png", InvalidRequestError, "fetched by load_image", id="url-sync"),
])
def test_bad_images_are_rejected_naming_the_input(value: object, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern) as caught:
        read_image(value, LIMITS, 3)  # type: ignore[arg-type]
    assert caught.value.param == "input[3]"
    assert caught.value.message.startswith("input[3]")


def test_byte_cap_applies_before_decoding_base64() -> None:
    limits = LimitsConfig(max_image_bytes=1000)
    data = png_bytes(make_image(64, 64))
    assert len(data) > 1000
    with pytest.raises(PayloadTooLargeError, match="larger than 1000 bytes"):
        read_image(data, limits, 0)
    with pytest.raises(PayloadTooLargeError, match="larger than 1000 bytes"):
        read_image("A" * 2000, limits, 0)  # estimated from the text length; never decoded


def test_pixel_cap_is_read_from_the_header_only() -> None:
    limits = LimitsConfig(max_image_pixels=100 * 100)
    assert read_image(png_bytes(make_image(100, 100)), limits, 0).width == 100
    with pytest.raises(PayloadTooLargeError, match="101x100"):
        read_image(png_bytes(make_image(101, 100)), limits, 0)
    with pytest.raises(PayloadTooLargeError):
        read_image(make_image(101, 100), limits, 0)


# --- URL policy -------------------------------------------------------------------------

@pytest.mark.parametrize("address,allowed", [
    ("8.8.8.8", True), ("1.1.1.1", True), ("2606:4700:4700::1111", True),
    ("127.0.0.1", False), ("127.8.9.10", False), ("0.0.0.0", False), ("10.1.2.3", False),
    ("172.16.0.1", False), ("192.168.1.1", False), ("169.254.169.254", False), ("100.64.0.1", False),
    ("224.0.0.1", False), ("239.255.255.250", False), ("240.0.0.1", False), ("255.255.255.255", False),
    ("::1", False), ("::", False), ("fe80::1", False), ("fc00::1", False), ("fd12:3456::1", False),
    ("ff02::1", False), ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False), ("::ffff:8.8.8.8", True),
    ("2002:7f00:1::", False), ("2001:db8::1", False),
])
def test_only_public_unicast_addresses_are_allowed(address: str, allowed: bool) -> None:
    assert address_allowed(ipaddress.ip_address(address)) is allowed


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/a.png", "http://localhost:8080/a.png", "http://[::1]/a.png", "http://0.0.0.0/a.png",
    "http://2130706433/a.png",  # 127.0.0.1 as one decimal number
])
async def test_loopback_urls_are_refused_without_connecting(url: str) -> None:
    with pytest.raises(InvalidRequestError, match="forbidden") as caught:
        await load_image(url, LimitsConfig(allow_image_urls=True), 5)
    assert caught.value.param == "input[5]"


@pytest.mark.parametrize("url,pattern", [
    ("ftp://example.com/a.png", "must be http"), ("file:///etc/passwd", "must be http"),
    ("http://user:secret@127.0.0.1/a.png", "credentials"),
])
async def test_other_schemes_and_credentials_are_refused(url: str, pattern: str) -> None:
    with pytest.raises(InvalidRequestError, match=pattern):
        await load_image(url, LimitsConfig(allow_image_urls=True), 0)


async def test_urls_are_refused_when_disabled() -> None:
    with pytest.raises(InvalidRequestError, match="disabled") as caught:
        await load_image("https://example.com/a.png", LIMITS, 1)
    assert caught.value.param == "input[1]"


# --- fetching, against loopback servers (the address policy opened for 127.0.0.1 only) ----

Handler = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
def loopback_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the fetcher reach 127.0.0.1 (where the test servers are); everything else keeps the real policy."""
    real = images.address_allowed
    monkeypatch.setattr(images, "address_allowed", lambda a: str(a) == "127.0.0.1" or real(a))


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> str:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                request = await reader.readuntil(b"\r\n\r\n")
                await handler(request, writer)
                await writer.drain()
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def reply(body: bytes, status: str = "200 OK", headers: str = "") -> Handler:
    async def handler(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n{headers}\r\n"
                     .encode() + body)
    return handler


URL_LIMITS = LimitsConfig(allow_image_urls=True, image_url_timeout_s=2.0)


async def test_fetch_reads_an_image_and_sends_the_original_host(loopback_allowed: None, serve) -> None:
    data = png_bytes(make_image(16, 12))
    seen: list[bytes] = []

    async def handler(request: bytes, writer: asyncio.StreamWriter) -> None:
        seen.append(request)
        await reply(data)(request, writer)

    base = await serve(handler)
    image = await load_image(f"{base}/pic.png?x=1", URL_LIMITS, 0)
    assert (image.data, image.width, image.height) == (data, 16, 12)
    assert b"GET /pic.png?x=1 HTTP/1.1" in seen[0]
    assert f"host: {base.removeprefix('http://')}".encode() in seen[0].lower()


async def test_fetch_follows_redirects_to_allowed_hosts_only(loopback_allowed: None, serve) -> None:
    data = png_bytes(make_image(8, 8))
    target = await serve(reply(data))
    hop = await serve(reply(b"", "302 Found", f"Location: {target}/final.png\r\n"))
    assert (await load_image(f"{hop}/start", URL_LIMITS, 0)).data == data
    port = target.rsplit(":", 1)[1]
    forbidden = await serve(reply(b"", "301 Moved", f"Location: http://127.0.0.2:{port}/x.png\r\n"))
    with pytest.raises(InvalidRequestError, match="forbidden"):
        await load_image(f"{forbidden}/start", URL_LIMITS, 0)
    loop = await serve(reply(b"", "302 Found", "Location: /again\r\n"))
    with pytest.raises(InvalidRequestError, match="redirected more than"):
        await load_image(f"{loop}/start", URL_LIMITS, 0)


async def test_fetch_caps_the_size_while_streaming(loopback_allowed: None, serve) -> None:
    limits = LimitsConfig(allow_image_urls=True, max_image_bytes=10_000)
    declared = await serve(reply(b"x" * 20_000))
    with pytest.raises(PayloadTooLargeError, match="larger than 10000"):
        await load_image(f"{declared}/big", limits, 0)

    async def chunked_forever(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(1000):  # would be 4 MB; the client must stop long before
            writer.write(b"1000\r\n" + b"y" * 4096 + b"\r\n")
            await writer.drain()
    chunked = await serve(chunked_forever)
    with pytest.raises(PayloadTooLargeError, match="larger than 10000"):
        await load_image(f"{chunked}/endless", limits, 0)


async def test_fetch_errors_and_timeouts_are_client_errors(loopback_allowed: None, serve) -> None:
    missing = await serve(reply(b"nope", "404 Not Found"))
    with pytest.raises(InvalidRequestError, match="HTTP 404"):
        await load_image(f"{missing}/a.png", URL_LIMITS, 0)
    not_image = await serve(reply(b"<html>hello</html>"))
    with pytest.raises(InvalidRequestError, match="not an image"):
        await load_image(f"{not_image}/a.png", URL_LIMITS, 0)

    async def stall(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        await asyncio.sleep(5)
    slow = await serve(stall)
    started = asyncio.get_running_loop().time()
    with pytest.raises(InvalidRequestError, match="longer than 0.5 s"):
        await load_image(f"{slow}/a.png", LimitsConfig(allow_image_urls=True, image_url_timeout_s=0.5), 0)
    assert asyncio.get_running_loop().time() - started < 2.0
