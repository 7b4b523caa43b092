"""How an image becomes the RGB pixels the model sees, and how big the model sees it.

Two rules, each the reference encoder's own (jina-embeddings-v4's ``encode_image``):

- **Files** (bytes, base64, data URIs, paths, URLs) are loaded with
  ``Image.open(f).convert("RGB")``: the first frame, EXIF orientation ignored, and
  transparency DROPPED (a transparent pixel keeps the colour it stores, often black).
- **PIL images** go straight to the Qwen2-VL image processor, whose RGB conversion
  composites a non-RGB image onto white (``convert("RGBA")``, alpha-composite on white).

vLLM's own loader differs from both (it applies EXIF orientation and composites onto
white), so an image vLLM would see differently is converted here and sent as an RGB PNG;
an RGB JPEG/PNG/WebP without orientation or animation is sent as received, after reading
its header only. ``image_alpha: white`` in the limits applies the PIL rule to files too.

The size the model keeps of an image is the checkpoint's :class:`~jv4_vllm.core.spec.ImageGeometry`
(its processor's ``preprocessor_config.json``, or a deployment's ``--mm-processor-kwargs``):
the pixel limit follows it (:func:`model_image_limits`).
"""

from __future__ import annotations

import json
import struct
from typing import Literal

from PIL import Image

from jv4_vllm.config import Config, LimitsConfig
from jv4_vllm.core.spec import MAX_ASPECT_RATIO, load_image_geometry

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "MAX_ASPECT_RATIO",
    "PASS_THROUGH_MIMES",
    "PIXEL_HEADROOM",
    "ImageAlpha",
    "file_rgb",
    "mm_processor_overrides",
    "model_image_limits",
    "needs_conversion",
    "processor_rgb",
    "to_rgb",
]

ImageAlpha = Literal["reference", "white"]

PASS_THROUGH_MIMES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000  # decompression-bomb guard: never more, whatever the model
PIXEL_HEADROOM = 64  # accept up to 64x the pixels the processor keeps (8x per side), then refuse
_ORIENTATION = 0x0112
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_WHITE = (255, 255, 255, 255)


def file_rgb(image: Image.Image) -> Image.Image:
    """The reference's rule for files: ``convert("RGB")``, alpha dropped, no EXIF rotation."""
    return image.convert("RGB")


def processor_rgb(image: Image.Image) -> Image.Image:
    """The reference's rule for PIL images: non-RGB images composited onto white."""
    if image.mode == "RGB":
        return image
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")


def to_rgb(image: Image.Image, *, is_file: bool, alpha: ImageAlpha) -> Image.Image:
    """The RGB image the model sees for ``image`` (its current frame)."""
    return file_rgb(image) if is_file and alpha == "reference" else processor_rgb(image)


def needs_conversion(header: Image.Image, data: bytes, alpha: ImageAlpha) -> bool:
    """Whether vLLM would see the opened file ``header`` differently from the reference.

    Reads only what Pillow parsed from the header (and, for PNG, the chunk list): never
    the pixels. vLLM converts non-RGB modes itself, but with white compositing and after
    EXIF rotation, so anything but a plain RGB single-frame image is converted here.
    """
    if header.format not in PASS_THROUGH_MIMES or header.mode != "RGB":
        return True
    if getattr(header, "n_frames", 1) != 1:
        return True
    if header.format == "PNG":
        chunks = _png_chunk_types(data)
        # eXIf may follow the pixels (Pillow then decodes them to read it): convert to be safe.
        return chunks is None or b"eXIf" in chunks or b"acTL" in chunks
    try:
        orientation = header.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block: convert, which drops it
        return True
    # (An RGB image with a tRNS colour key passes: the reference and vLLM both ignore the key.)
    return orientation not in (1, None)


def _png_chunk_types(data: bytes) -> set[bytes] | None:
    """The chunk types of a PNG file, walking the chunk headers; None if the walk breaks."""
    if not data.startswith(_PNG_SIGNATURE):
        return None
    types: set[bytes] = set()
    offset = len(_PNG_SIGNATURE)
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        types.add(kind)
        if kind == b"IEND":
            return types
        offset += 12 + length
    return None  # truncated: let the caller convert (and so decode) it


def mm_processor_overrides(extra_args: list[str]) -> dict[str, int]:
    """``min_pixels``/``max_pixels`` a deployment passes vLLM with ``--mm-processor-kwargs``."""
    for position, arg in enumerate(extra_args):
        value = None
        if arg == "--mm-processor-kwargs" and position + 1 < len(extra_args):
            value = extra_args[position + 1]
        elif arg.startswith("--mm-processor-kwargs="):
            value = arg.split("=", 1)[1]
        if value is not None:
            kwargs = json.loads(value)
            return {k: int(kwargs[k]) for k in ("min_pixels", "max_pixels") if k in kwargs}
    return {}


def model_image_limits(config: Config) -> LimitsConfig:
    """``config.limits`` with the pixel limit resolved: unless set, it follows the model.

    The processor keeps at most ``max_pixels`` of any image; a larger one only costs decode
    time and memory (in vLLM, and here when it needs conversion), so the limit is
    :data:`PIXEL_HEADROOM` times that, never above :data:`DEFAULT_MAX_IMAGE_PIXELS`.
    """
    limits = config.limits
    if limits.max_image_pixels is not None:
        return limits
    overrides = mm_processor_overrides(config.vllm.extra_args)
    kept = [overrides.get("max_pixels") or load_image_geometry(config.task_dir(task)).max_pixels
            for task in config.tasks if (config.task_dir(task) / "preprocessor_config.json").is_file()]
    if not kept:
        return limits
    return limits.model_copy(update={"max_image_pixels": min(PIXEL_HEADROOM * max(kept), DEFAULT_MAX_IMAGE_PIXELS)})
