"""Real inputs at parity through the real router and vLLM: every kind of image file, PIL
images through the Python client, white compositing when configured, and long texts
(the deployment's full length, and one cut by ``truncate``), in both roles."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from jv4_vllm import Client
from jv4_vllm.client import AsyncClient
from jv4_vllm.oracle.probes import MARGIN_TOKENS, OVER_TOKENS, image_files, long_text, transparent_png

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

SINGLE_MIN, ROW_MIN = 0.9999, 0.999
FILES = image_files()


def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def embed(router_url: str, inputs: list, task: str, multivector: bool = False, **extra: object) -> list[np.ndarray]:
    body = {"input": inputs, "task": task, "return_multivector": multivector, "embedding_type": "float", **extra}
    response = httpx.post(f"{router_url}/v1/embeddings", json=body, timeout=600)
    assert response.status_code == 200, response.text
    key = "embeddings" if multivector else "embedding"
    return [np.asarray(item[key], np.float32) for item in response.json()["data"]]


def b64(data: bytes) -> dict[str, str]:
    return {"image": base64.b64encode(data).decode("ascii")}


def opened(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize("task", ["retrieval", "code"])
def test_every_image_file_kind_at_parity_through_the_router(router_url, reference, parity_report, task):
    names = sorted(FILES)
    files = [FILES[n] for n in names]
    got = embed(router_url, [b64(f) for f in files], f"{task}.passage")
    want = reference.encode_image(files, task=task)
    got_multi = embed(router_url, [b64(f) for f in files], f"{task}.passage", multivector=True)
    want_multi = reference.encode_image(files, task=task, return_multivector=True)
    for name, g, w, gm, wm in zip(names, got, want, got_multi, want_multi, strict=True):
        single = float(cos(g, w)[0])
        assert gm.shape == wm.shape, name
        rows = float(cos(gm, wm).min())
        parity_report.append(("router", f"{task} image {name}", "single", 1, single))
        parity_report.append(("router", f"{task} image {name}", "multi", gm.shape[0], rows))
        assert single >= SINGLE_MIN, (name, single)
        assert rows >= ROW_MIN, (name, rows)


def test_the_parity_check_tells_transparency_rules_apart(router_url, reference, parity_report):
    """Served as vLLM alone would (white) the transparent probe misses the reference: the
    parity above would fail if the service composited instead of dropping alpha."""
    data = transparent_png()
    served = embed(router_url, [b64(data)], "retrieval.passage")[0]
    dropped = reference.encode_image([data], task="retrieval")[0]
    white = reference.encode_image([opened(data)], task="retrieval")[0]  # a PIL image: composited
    parity_report.append(("router", "rgba-png vs white-composited ref", "single", 1, float(cos(served, white)[0])))
    assert cos(served, dropped)[0] >= SINGLE_MIN
    assert cos(served, white)[0] < SINGLE_MIN


def test_pil_images_through_the_client_at_parity(router_url, reference, parity_report):
    base = opened(transparent_png(112, 144))
    images = {"rgba": base, "la": base.convert("LA"), "cmyk": base.convert("CMYK"), "grey": base.convert("L")}
    palette = base.convert("RGB").quantize(colors=16)
    palette.info["transparency"] = 0
    images["palette-trns"] = palette
    with Client(router_url) as client:
        got = client.encode_image(list(images.values()), task="retrieval")
        multi = client.encode_image(list(images.values()), task="retrieval", return_multivector=True)
    want = reference.encode_image(list(images.values()), task="retrieval")
    want_multi = reference.encode_image(list(images.values()), task="retrieval", return_multivector=True)
    for name, g, w, gm, wm in zip(images, got, want, multi, want_multi, strict=True):
        parity_report.append(("client", f"PIL {name}", "single", 1, float(cos(g, w)[0])))
        assert cos(g, w)[0] >= SINGLE_MIN, name
        assert gm.shape == wm.shape and cos(gm, wm).min() >= ROW_MIN, name


async def test_white_compositing_when_configured(vllm_stack, reference, parity_report):
    config = vllm_stack.model_copy(update={"limits": vllm_stack.limits.model_copy(update={"image_alpha": "white"})})
    names = ["rgba-png", "la-png", "palette-trns-png", "animated-gif", "rgb-jpeg"]
    client = await AsyncClient.direct(config)
    try:
        got = await client.encode_image([FILES[n] for n in names], task="text-matching")
    finally:
        await client.aclose()
    want = reference.encode_image([opened(FILES[n]) for n in names], task="text-matching")
    for name, g, w in zip(names, got, want, strict=True):
        parity_report.append(("engine/white", f"image {name}", "single", 1, float(cos(g, w)[0])))
        assert cos(g, w)[0] >= SINGLE_MIN, name


def test_broken_and_unfit_images_are_client_errors_naming_the_input(router_url):
    jpeg = FILES["rgb-jpeg"]
    cut = jpeg[: len(jpeg) * 2 // 3]  # header intact: sent as received, vLLM refuses it
    tall = io.BytesIO()
    Image.new("RGB", (2, 500), (0, 90, 200)).save(tall, format="PNG")
    for inputs, pattern in (([b64(FILES["rgb-png-tall"]), b64(cut)], "input[1]"),
                            ([{"text": "a"}, {"text": "b"}, b64(tall.getvalue())], "input[2]")):
        response = httpx.post(f"{router_url}/v1/embeddings", json={"input": inputs}, timeout=120)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == pattern and pattern in error["message"], error


@pytest.mark.parametrize("role", ["query", "passage"])
def test_long_texts_at_parity_full_length_and_truncated(router_url, vllm_stack, reference, parity_report, role):
    limit = vllm_stack.vllm.max_model_len
    tokenizer = reference.processor.tokenizer

    def count(text: str) -> int:
        return len(tokenizer(text)["input_ids"])

    full = long_text(count, limit - MARGIN_TOKENS, seed=2)
    over = long_text(count, limit + OVER_TOKENS, seed=3)
    ids = reference.text_token_ids([full, over], task="code", prompt_name=role, max_length=limit)
    assert len(ids[0]) > limit - 2 * MARGIN_TOKENS and len(ids[1]) == limit  # as long as the deployment allows
    task = f"code.{role}"
    for multivector in (False, True):
        got = embed(router_url, [full], task, multivector) + embed(router_url, [over], task, multivector,
                                                                     truncate=True)
        want = reference.encode_text([full, over], task="code", prompt_name=role, return_multivector=multivector,
                                     max_length=limit)
        for name, g, w in zip(("full-length", "truncated"), got, want, strict=True):
            assert g.shape == w.shape, name
            value = float(cos(g, w).min())
            parity_report.append(("router", f"code.{role} text {name}", "multi" if multivector else "single",
                                  g.shape[0] if multivector else 1, value))
            assert value >= (ROW_MIN if multivector else SINGLE_MIN), (name, value)
    response = httpx.post(f"{router_url}/v1/embeddings", json={"input": ["x", over], "task": task}, timeout=120)
    assert response.status_code == 400 and response.json()["error"]["param"] == "input[1]"
