"""Image rules: every kind of file gives the model exactly the reference's pixels.

The reference loads files with ``Image.open(f).convert("RGB")`` and hands PIL images to
its processor (non-RGB composited onto white); vLLM's loader rotates by EXIF and
composites onto white. What we send must make vLLM's loader produce the reference's
pixels, bit for bit.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jv4_vllm.config import Config, LimitsConfig
from jv4_vllm.core.image_rules import (
    DEFAULT_MAX_IMAGE_PIXELS,
    PIXEL_HEADROOM,
    mm_processor_overrides,
    model_image_limits,
)
from jv4_vllm.core.images import decode_image, read_image
from jv4_vllm.core.spec import ImageGeometry
from jv4_vllm.errors import InvalidRequestError
from jv4_vllm.oracle.probes import image_files, pil_probes, transparent_png
from jv4_vllm.oracle.upstream_images import load_reference_image

LIMITS = LimitsConfig()
WHITE = LimitsConfig(image_alpha="white")
FILES = image_files()
PASS_THROUGH = {"rgb-jpeg", "rgb-png-448", "rgb-png-tall", "rgb16-png"}


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB") if image.mode != "RGB" else image)


def opened(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def vllm_sees(data: bytes) -> Image.Image:
    """What vLLM's loader makes of the bytes we send: EXIF rotation, then white compositing."""
    image = Image.open(io.BytesIO(data))
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image)
    image.load()
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.split()[3])
        return out
    return image.convert("RGB")


@pytest.mark.parametrize("kind", sorted(FILES))
def test_every_file_kind_reaches_the_model_as_the_reference_loads_it(kind: str) -> None:
    data = FILES[kind]
    sent = decode_image(data, LIMITS, 0)
    want = pixels(load_reference_image(data))
    assert np.array_equal(pixels(vllm_sees(sent.data)), want), kind
    assert (sent.width, sent.height) == (want.shape[1], want.shape[0])
    assert (sent.data == data) == (kind in PASS_THROUGH)  # only plain RGB files travel untouched


@pytest.mark.vllm
def test_the_loader_model_above_is_vllms_own() -> None:
    """vllm_sees() is checked against vLLM's real image loader, on what we send and on raw files."""
    media = pytest.importorskip("vllm.multimodal.media.image")
    loader = media.ImageMediaIO()
    for kind, data in FILES.items():
        for sent in (data, decode_image(data, LIMITS, 0).data):
            assert np.array_equal(pixels(loader.load_bytes(sent).media), pixels(vllm_sees(sent))), kind


@pytest.mark.parametrize("kind", sorted(FILES))
def test_white_mode_composites_every_file_as_the_processor_does_a_pil_image(kind: str) -> None:
    sent = decode_image(FILES[kind], WHITE, 0)
    assert np.array_equal(pixels(vllm_sees(sent.data)), pixels(load_reference_image(opened(FILES[kind]))))


def test_the_rules_differ_where_it_matters() -> None:
    """The transparent probe stores dark blue under alpha 0: dropped alpha shows it, white hides it."""
    data = transparent_png()
    dropped = pixels(vllm_sees(decode_image(data, LIMITS, 0).data))
    white = pixels(vllm_sees(decode_image(data, WHITE, 0).data))
    assert tuple(dropped[0, 0]) == (20, 30, 140) and tuple(white[0, 0]) == (255, 255, 255)
    # Sent as received, vLLM would composite: the reference would not see that image.
    assert not np.array_equal(pixels(vllm_sees(data)), dropped)


def test_exif_orientation_is_ignored_like_the_reference() -> None:
    sent = decode_image(FILES["exif-rotated-jpeg"], LIMITS, 0)
    out = opened(sent.data)
    assert out.format == "PNG" and out.getexif().get(0x0112) is None  # nothing left for vLLM to rotate
    assert (sent.width, sent.height) == (200, 96)  # not rotated to 96x200


def test_animation_keeps_the_first_frame() -> None:
    gif = opened(FILES["animated-gif"])
    first = pixels(gif)
    gif.seek(1)
    assert not np.array_equal(pixels(gif), first)
    assert np.array_equal(pixels(opened(decode_image(FILES["animated-gif"], LIMITS, 0).data)), first)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "P", "PA", "CMYK", "I;16", "1"])
def test_pil_images_get_the_processor_rule_in_both_modes(mode: str) -> None:
    base = opened(transparent_png(48, 40))
    image = base if mode == "RGBA" else base.convert(mode)
    if mode == "P":
        image.info["transparency"] = 0
    want = pixels(load_reference_image(image))
    for limits in (LIMITS, WHITE):
        assert np.array_equal(pixels(opened(read_image(image, limits, 0).data)), want), mode


def test_pil_probe_is_composited_onto_white() -> None:
    image = opened(pil_probes()["pil-rgba"])
    sent = pixels(opened(read_image(image, LIMITS, 0).data))
    assert tuple(sent[0, 0]) == (255, 255, 255)


def test_an_unconvertible_pil_mode_is_a_client_error() -> None:
    image = Image.new("LA", (8, 8)).convert("La")
    with pytest.raises(InvalidRequestError, match=r"input\[2\]: cannot convert a PIL image of mode 'La'"):
        read_image(image, LIMITS, 2)


# --- pass-through never decodes ------------------------------------------------------------

def test_a_plain_jpeg_is_sent_without_decoding_its_pixels() -> None:
    data = FILES["rgb-jpeg"]
    cut = data[: len(data) * 2 // 3]  # header intact, scan data missing: only a decode would notice
    assert decode_image(cut, LIMITS, 0).data == cut


def test_png_chunk_checksums_are_checked_without_decoding() -> None:
    data = bytearray(FILES["rgb-png-tall"])
    data[data.index(b"IDAT") + 10] ^= 0xFF
    with pytest.raises(InvalidRequestError, match="broken or truncated"):
        decode_image(bytes(data), LIMITS, 0)


def _with_chunk_before_iend(png: bytes, kind: bytes, payload: bytes) -> bytes:
    chunk = struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    end = png.rindex(b"IEND") - 4
    return png[:end] + chunk + png[end:]


def test_a_png_with_exif_after_its_pixels_is_converted() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _with_chunk_before_iend(FILES["rgb-png-tall"], b"eXIf", exif.tobytes()[6:])
    sent = decode_image(data, LIMITS, 0)
    assert sent.data != data and opened(sent.data).size == (96, 288)
    assert np.array_equal(pixels(vllm_sees(sent.data)), pixels(load_reference_image(data)))


# --- geometry: the size the processor keeps --------------------------------------------------

@pytest.mark.parametrize("size", [(1, 1), (56, 56), (64, 48), (448, 448), (100, 300), (1000, 20), (4000, 3000),
                                  (27, 29), (3000, 15), (397, 8), (10, 1500), (300, 2)])
def test_image_tokens_match_the_processor(size: tuple[int, int]) -> None:
    transformers = pytest.importorskip("transformers")
    geometry = ImageGeometry(min_pixels=3136, max_pixels=200704)  # the engine's token count for admission
    processor = transformers.Qwen2VLImageProcessor(min_pixels=3136, max_pixels=200704, patch_size=14, merge_size=2)
    out = processor(images=[Image.new("RGB", size, (90, 120, 200))], return_tensors="np")
    t, h, w = out["image_grid_thw"][0]
    assert geometry.tokens(*size) == t * h * w // 4
    assert geometry.resized(*size) == (w * 14, h * 14)


def test_aspect_ratios_the_model_refuses_are_client_errors() -> None:
    with pytest.raises(InvalidRequestError, match=r"input\[4\]: image is 2x500 pixels.*200:1"):
        read_image(Image.new("RGB", (2, 500)), LIMITS, 4)
    with pytest.raises(ValueError, match="aspect ratio"):
        ImageGeometry(3136, 200704).resized(3000, 14)


def _prepared(tmp_path: Path, tasks: dict[str, dict]) -> Config:
    for task, processor in tasks.items():
        (tmp_path / task).mkdir()
        (tmp_path / task / "preprocessor_config.json").write_text(json.dumps(processor))
    return Config.model_validate({"prepared_dir": str(tmp_path),
                                  "deployments": {t: {"urls": ["http://127.0.0.1:1"]} for t in tasks}})


def test_the_pixel_limit_follows_the_model(tmp_path: Path) -> None:
    config = _prepared(tmp_path, {"retrieval": {"min_pixels": 3136, "max_pixels": 200704},
                                  "code": {"size": {"shortest_edge": 3136, "longest_edge": 100352}}})
    assert model_image_limits(config).max_image_pixels == PIXEL_HEADROOM * 200704
    # Never above the decompression-bomb guard, and an explicit limit wins.
    (tmp_path / "big").mkdir()
    big = _prepared(tmp_path / "big", {"retrieval": {"max_pixels": 12845056}})
    assert model_image_limits(big).max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS
    explicit = config.model_copy(update={"limits": LimitsConfig(max_image_pixels=1234)})
    assert model_image_limits(explicit).max_image_pixels == 1234
    # A deployment's --mm-processor-kwargs is what vLLM keeps.
    flagged = config.model_copy(update={"vllm": config.vllm.model_copy(
        update={"extra_args": ["--mm-processor-kwargs", '{"max_pixels": 50176}']})})
    assert model_image_limits(flagged).max_image_pixels == PIXEL_HEADROOM * 50176


def test_mm_processor_overrides_are_read_in_both_spellings() -> None:
    assert mm_processor_overrides(["--enforce-eager"]) == {}
    assert mm_processor_overrides(['--mm-processor-kwargs={"min_pixels": 10, "fps": 2}']) == {"min_pixels": 10}


def test_without_a_model_the_bomb_guard_applies() -> None:
    with pytest.raises(Exception, match="the limit is 40000000"):
        read_image(Image.new("RGB", (8000, 5001)), LIMITS, 0)


def test_the_router_and_the_direct_client_read_images_with_the_models_limit(tmp_path: Path) -> None:
    from jv4_vllm.router.app import create_app

    config = _prepared(tmp_path, {"retrieval": {"min_pixels": 3136, "max_pixels": 200704}})
    assert create_app(config).state.config.limits.max_image_pixels == PIXEL_HEADROOM * 200704
