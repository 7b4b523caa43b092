"""How jina-embeddings-v4's own ``encode_image`` turns its inputs into RGB images.

Written from the public reference code, on purpose apart from the service's
:mod:`jv4_vllm.core.image_rules`, so that a parity test compares two readings of the
reference instead of one piece of code with itself:

- a path or URL string is opened and ``convert("RGB")``-ed: first frame, EXIF orientation
  ignored, transparency dropped (transparent pixels keep their stored colour); encoded
  bytes are treated like a file here (the reference takes no bytes);
- a PIL image goes to the Qwen2-VL image processor as it is, whose RGB conversion (in the
  transformers release the reference runs on) composites a non-RGB image onto white.
  transformers 5 converts without compositing, so that step is done here explicitly.
"""

from __future__ import annotations

import io
from pathlib import Path

import httpx
from PIL import Image

__all__ = ["ReferenceImage", "load_reference_image"]

ReferenceImage = Image.Image | str | Path | bytes


def _opened_as_file(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def _as_the_processor_converts(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def load_reference_image(image: ReferenceImage) -> Image.Image:
    """The RGB image the reference model is given for ``image``."""
    if isinstance(image, Image.Image):
        return _as_the_processor_converts(image)
    if isinstance(image, (bytes, bytearray)):
        return _opened_as_file(Image.open(io.BytesIO(bytes(image))))
    if isinstance(image, str) and image.startswith("http"):
        response = httpx.get(image, follow_redirects=True, timeout=60)
        response.raise_for_status()
        return _opened_as_file(Image.open(io.BytesIO(response.content)))
    with Image.open(image) as opened:
        return _opened_as_file(opened)
