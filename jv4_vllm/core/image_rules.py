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

:class:`ImageGeometry` is the processor's resize rule (``smart_resize``), read from the
checkpoint's ``preprocessor_config.json``: the size the model keeps, its token count, and
the aspect ratios it refuses.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image

from jv4_vllm.config import Config, LimitsConfig

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "MAX_ASPECT_RATIO",
    "PASS_THROUGH_MIMES",
    "PIXEL_HEADROOM",
    "ImageAlpha",
    "ImageGeometry",
    "file_rgb",
    "mm_processor_overrides",
    "model_image_limits",
    "needs_conversion",
    "processor_rgb",
    "to_rgb",
]

ImageAlpha = Literal["reference", "white"]

PASS_THROUGH_MIMES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
MAX_ASPECT_RATIO = 200  # the Qwen2-VL processor refuses longer/shorter side ratios above this
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


@dataclass(frozen=True, slots=True)
class ImageGeometry:
    """The Qwen2-VL processor's resize rule for one checkpoint."""

    min_pixels: int
    max_pixels: int
    patch_size: int = 14
    merge_size: int = 2

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def resized(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the processor resizes an image to: multiples of ``factor``,
        pixels within [min_pixels, max_pixels], aspect ratio kept as closely as possible."""
        if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
            raise ValueError(f"aspect ratio {max(width, height) / min(width, height):.0f}:1 is over "
                             f"the model's {MAX_ASPECT_RATIO}:1")
        factor = self.factor
        h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
        if h_bar * w_bar > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            h_bar = max(factor, math.floor(height / beta / factor) * factor)
            w_bar = max(factor, math.floor(width / beta / factor) * factor)
        elif h_bar * w_bar < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h_bar = math.ceil(height * beta / factor) * factor
            w_bar = math.ceil(width * beta / factor) * factor
        return w_bar, h_bar

    def image_tokens(self, width: int, height: int) -> int:
        """``<|image_pad|>`` tokens the image expands to in the prompt."""
        w_bar, h_bar = self.resized(width, height)
        return (w_bar // self.patch_size) * (h_bar // self.patch_size) // (self.merge_size ** 2)

    @classmethod
    def from_checkpoint(cls, directory: str | Path, overrides: dict[str, int] | None = None) -> ImageGeometry:
        """Read ``preprocessor_config.json`` (``min_pixels``/``max_pixels`` win over ``size``,
        as in transformers); ``overrides`` are the deployment's ``--mm-processor-kwargs``."""
        raw = json.loads((Path(directory) / "preprocessor_config.json").read_text(encoding="utf-8"))
        size = raw.get("size") or {}
        values = {
            "min_pixels": raw.get("min_pixels") or size.get("shortest_edge") or 56 * 56,
            "max_pixels": raw.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280,
            "patch_size": raw.get("patch_size") or 14,
            "merge_size": raw.get("merge_size") or 2,
        }
        values.update({k: v for k, v in (overrides or {}).items() if k in values})
        return cls(**{k: int(v) for k, v in values.items()})


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
    kept = [ImageGeometry.from_checkpoint(config.task_dir(task), overrides).max_pixels
            for task in config.tasks if (config.task_dir(task) / "preprocessor_config.json").is_file()]
    if not kept:
        return limits
    return limits.model_copy(update={"max_image_pixels": min(PIXEL_HEADROOM * max(kept), DEFAULT_MAX_IMAGE_PIXELS)})
