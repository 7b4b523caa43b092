"""The probe set ``verify`` and the golden files use: what users actually send.

Texts in several languages, from a few tokens to as long as the deployment allows, and one
over that length sent with ``truncate``; documents split into chunks for late chunking (one
within the window, one longer than it: windowed); image files of every kind that loads differently
(transparency, grey levels, palettes, CMYK, 16-bit, EXIF orientation, animation), and one
PIL image with transparency (the Python client's other rule). Everything is generated
deterministically, so a golden file made elsewhere names the same inputs.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

__all__ = ["LONG_TOKENS", "Probes", "build_probes", "chunked", "image_files", "long_text", "pil_probes"]

LONG_TOKENS = 4096  # "several thousand tokens": the long probe, when the deployment allows it
LATE_CHUNKS = 8  # chunks of each late-chunking document
MARGIN_TOKENS = 16  # room for the longest role prefix
OVER_TOKENS = 256  # how far the truncated probe runs past the deployment's limit

SHORT_TEXTS = {
    "en-short": "What is late interaction retrieval?",
    "de": "Die Katze schläft auf dem warmen Fensterbrett.",
    "zh": "向量检索把文本和图像映射到同一个空间。",
    "ar": "تعمل نماذج التضمين على تحويل النص إلى متجهات.",
    "code": "def mean(xs):\n    return sum(xs) / len(xs)",
    "en-paragraph": " ".join(["Long documents are split into passages before they are embedded."] * 14),
}
_WORDS = ("retrieval embedding document passage vector model token image query index search language "
          "context window layer attention memory batch server request answer page table figure "
          "Dokument Suche Bild Sprache 向量 文本 图像 检索 مستند بحث صورة").split()


@dataclass(frozen=True)
class Probes:
    """Inputs by name: texts (some sent with truncate), late-chunking documents (their chunks),
    image files, PIL images (as PNG files)."""

    texts: dict[str, str]
    truncated: frozenset[str] = frozenset()
    images: dict[str, bytes] = field(default_factory=dict)
    pil_images: dict[str, bytes] = field(default_factory=dict)
    late_chunks: dict[str, list[str]] = field(default_factory=dict)


def long_text(count_tokens: Callable[[str], int], tokens: int, seed: int = 0) -> str:
    """A deterministic mixed-language text of about ``tokens`` tokens (never more)."""
    rng = np.random.default_rng(seed)
    sentences: list[str] = []
    while True:
        words = rng.choice(_WORDS, size=int(rng.integers(6, 16)))
        sentences.append(" ".join(words).capitalize() + ".")
        if len(sentences) % 64 == 0 and count_tokens(" ".join(sentences)) >= tokens:
            break
    words = " ".join(sentences).split(" ")
    low, high = 1, len(words)  # the most words that fit: binary search on the word count
    while low < high:
        middle = (low + high + 1) // 2
        if count_tokens(" ".join(words[:middle])) <= tokens:
            low = middle
        else:
            high = middle - 1
    return " ".join(words[:low])


def build_probes(count_tokens: Callable[[str], int], max_tokens: int) -> Probes:
    """Every probe for a deployment keeping ``max_tokens`` prompt tokens."""
    room = max_tokens - MARGIN_TOKENS
    texts = dict(SHORT_TEXTS)
    texts["long"] = long_text(count_tokens, min(LONG_TOKENS, room), seed=1)
    if room > LONG_TOKENS:
        texts["full-length"] = long_text(count_tokens, room, seed=2)
    texts["over-length"] = long_text(count_tokens, max_tokens + OVER_TOKENS, seed=3)
    late = {"late-chunks": chunked(long_text(count_tokens, min(1024, room // 2), seed=4)),
            "late-chunks-windowed": chunked(long_text(count_tokens, max_tokens * 3 // 2, seed=5))}
    return Probes(texts=texts, truncated=frozenset({"over-length"}), images=image_files(),
                  pil_images=pil_probes(), late_chunks=late)


def chunked(text: str, chunks: int = LATE_CHUNKS) -> list[str]:
    """``text`` cut at sentence ends into about ``chunks`` chunks (the way a splitter would)."""
    sentences = [s if s.endswith(".") else s + "." for s in text.rstrip(".").split(". ")]
    size = -(-len(sentences) // chunks)
    return [" ".join(sentences[i:i + size]) for i in range(0, len(sentences), size)]


# ---- images ---------------------------------------------------------------------------------


def _picture(width: int, height: int, seed: int = 0) -> np.ndarray:
    """An RGB pattern with gradients, edges and noise: [height, width, 3] uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                     ((x // 8 + y // 8) % 2) * 200], axis=-1)
    return ((base + rng.integers(0, 40, (height, width, 3))) % 256).astype(np.uint8)


def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _alpha_mask(width: int, height: int) -> np.ndarray:
    """Opaque disc in the middle, fully transparent corners, a soft ring between."""
    y, x = np.mgrid[0:height, 0:width]
    r = np.hypot((x - width / 2) / (width / 2), (y - height / 2) / (height / 2))
    return np.clip((1.0 - r) * 600, 0, 255).astype(np.uint8)


def transparent_png(width: int = 160, height: int = 120) -> bytes:
    """RGBA whose transparent pixels store dark blue, far from the white they show as."""
    rgb = _picture(width, height, seed=11)
    alpha = _alpha_mask(width, height)
    rgb[alpha == 0] = (20, 30, 140)
    return _save(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG")


def _png16_rgb(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[row].astype(">u2").tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def _exif_rotated_jpeg() -> bytes:
    """A wide JPEG whose EXIF says 'rotate 90° to display' (orientation 6)."""
    image = Image.fromarray(_picture(200, 96, seed=5), "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(image, "JPEG", quality=92, exif=exif.tobytes())


def _animated_gif() -> bytes:
    frames = [Image.fromarray(_picture(96, 80, seed=s), "RGB").convert("P") for s in (21, 22, 23)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def image_files() -> dict[str, bytes]:
    """Image files by kind, as a user would upload them."""
    grey = Image.fromarray(_picture(144, 112, seed=3)[..., 0], "L")
    palette = Image.fromarray(_picture(128, 96, seed=4), "RGB").quantize(colors=32)
    palette.info["transparency"] = 0  # palette entry 0 is transparent
    grey16 = Image.fromarray(_picture(120, 90, seed=6)[..., 1].astype(np.uint16) * 257)  # mode I;16
    return {
        "rgb-jpeg": _save(Image.fromarray(_picture(224, 160, seed=1), "RGB"), "JPEG", quality=92),
        "rgb-png-448": _save(Image.fromarray(_picture(448, 448, seed=2), "RGB"), "PNG"),
        "rgb-png-tall": _save(Image.fromarray(_picture(96, 288, seed=7), "RGB"), "PNG"),
        "rgba-png": transparent_png(),
        "la-png": _save(Image.fromarray(np.dstack([np.asarray(grey), _alpha_mask(144, 112)]), "LA"), "PNG"),
        "grey-jpeg": _save(grey, "JPEG", quality=92),
        "palette-trns-png": _save(palette, "PNG", transparency=0),
        "cmyk-jpeg": _save(Image.fromarray(_picture(160, 128, seed=8), "RGB").convert("CMYK"), "JPEG", quality=92),
        "grey16-png": _save(grey16, "PNG"),
        "rgb16-png": _png16_rgb(_picture(112, 84, seed=9).astype(np.uint16) * 257 + 17),
        "exif-rotated-jpeg": _exif_rotated_jpeg(),
        "animated-gif": _animated_gif(),
    }


def pil_probes() -> dict[str, bytes]:
    """Images given as PIL objects (stored as the PNG file they are opened from)."""
    return {"pil-rgba": transparent_png(112, 144)}
