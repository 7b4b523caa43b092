"""The engine and the direct client against real vLLM deployments, measured against the reference encoder."""

from __future__ import annotations

import numpy as np
import pytest
import pytest_asyncio

from images_util import SIZES, make_image, png_bytes
from jv4_vllm.client import AsyncClient
from jv4_vllm.core.engine import Engine
from jv4_vllm.errors import InputTooLongError, InvalidRequestError
from jv4_vllm.core.images import read_image
from jv4_vllm.config import LimitsConfig
from jv4_vllm.core.types import EmbedOptions, TextInput

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

TEXTS = [
    "What is the capital of France?",
    "Berlin ist die Hauptstadt von Deutschland und hat etwa 3,7 Millionen Einwohner.",
    "北京是中华人民共和国的首都。",
    "Москва — столица России.",
    "def add(a, b):\n    return a + b",
    " ".join(f"sentence {i} about embeddings, retrieval and late interaction." for i in range(12)),
]
ROLES = {"retrieval": ("query", "passage"), "text-matching": ("query",), "code": ("query", "passage")}
SINGLE_MIN, ROW_MIN = 0.9999, 0.999


def worst_row_cosine(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """Lowest per-row cosine over multi-vectors that must have the same shapes."""
    worst = 1.0
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        worst = min(worst, float(cosines(g, w).min()))
    return worst


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.atleast_2d(a).astype(np.float64)
    b = np.atleast_2d(b).astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def fp16_client(vllm_stack):
    client = await AsyncClient.direct(vllm_stack)
    yield client
    await client.aclose()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def bf16_client(vllm_stack):
    config = vllm_stack.model_copy(update={"backend": vllm_stack.backend.model_copy(update={"wire_dtype": "bfloat16"})})
    client = await AsyncClient.direct(config)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def images():
    return [make_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]


@pytest.mark.parametrize("wire", ["fp16", "bf16"])
@pytest.mark.parametrize("task", list(ROLES))
async def test_text_parity(task, wire, fp16_client, bf16_client, reference, parity_report):
    client = fp16_client if wire == "fp16" else bf16_client
    for role in ROLES[task]:
        got = await client.encode_text(TEXTS, task=task, prompt_name=role)
        want = reference.encode_text(TEXTS, task=task, prompt_name=role)
        cos = cosines(got, want)
        parity_report.append((f"engine/{wire}", f"{task}.{role} text", "single", len(TEXTS), float(cos.min())))
        assert cos.min() >= SINGLE_MIN, cos
        if wire == "bf16":
            continue  # the bf16 wire is reported; the bounds below are held on the default fp16 wire
        for dim in reference.matryoshka_dims:
            got_d = await client.encode_text(TEXTS, task=task, prompt_name=role, truncate_dim=dim)
            want_d = reference.encode_text(TEXTS, task=task, prompt_name=role, truncate_dim=dim)
            assert got_d.shape == (len(TEXTS), dim)
            assert cosines(got_d, want_d).min() >= SINGLE_MIN, dim
        got_m = await client.encode_text(TEXTS, task=task, prompt_name=role, return_multivector=True)
        want_m = reference.encode_text(TEXTS, task=task, prompt_name=role, return_multivector=True)
        worst = worst_row_cosine(got_m, want_m)
        parity_report.append((f"engine/{wire}", f"{task}.{role} text", "multi", len(TEXTS), worst))
        assert worst >= ROW_MIN


@pytest.mark.parametrize("wire", ["fp16", "bf16"])
@pytest.mark.parametrize("task", list(ROLES))
async def test_image_parity(task, wire, fp16_client, bf16_client, reference, images, parity_report):
    client = fp16_client if wire == "fp16" else bf16_client
    got = await client.encode_image(images, task=task)
    want = reference.encode_image(images, task=task)
    cos = cosines(got, want)
    parity_report.append((f"engine/{wire}", f"{task} image {len(SIZES)} sizes", "single", len(images), float(cos.min())))
    assert cos.min() >= SINGLE_MIN, cos
    if wire == "bf16":
        return
    small = reference.matryoshka_dims[0]
    got_d = await client.encode_image(images, task=task, truncate_dim=small)
    assert cosines(got_d, reference.encode_image(images, task=task, truncate_dim=small)).min() >= SINGLE_MIN
    got_m = await client.encode_image(images, task=task, return_multivector=True)
    want_m = reference.encode_image(images, task=task, return_multivector=True)
    worst = worst_row_cosine(got_m, want_m)
    parity_report.append((f"engine/{wire}", f"{task} image", "multi", len(images), worst))
    assert worst >= ROW_MIN


async def test_mixed_batch_in_order(vllm_stack, reference, images):
    """Texts and images across tasks, many small calls at once: every item back, in order."""
    engine = await Engine.start(vllm_stack)
    try:
        limits = LimitsConfig()
        items = []
        for i, text in enumerate(TEXTS):
            items.append(TextInput(text))
            items.append(read_image(png_bytes(images[i % len(images)]), limits, i))
        for task in ROLES:
            result = await engine.embed(items, EmbedOptions(task=task, role="passage" if task != "text-matching" else "query"))
            assert len(result.embeddings) == len(items)
            role = "passage" if task != "text-matching" else "query"
            want_text = reference.encode_text(TEXTS, task=task, prompt_name=role)
            want_image = reference.encode_image([images[i % len(images)] for i in range(len(TEXTS))], task=task)
            got = np.stack(result.embeddings)
            assert cosines(got[0::2], want_text).min() >= SINGLE_MIN
            assert cosines(got[1::2], want_image).min() >= SINGLE_MIN
            # usage counts every prompt's tokens, texts and images (calls finish concurrently)
            pictures = [images[i % len(images)] for i in range(len(TEXTS))]
            want_tokens = sum(map(len, reference.text_token_ids(TEXTS, task=task, prompt_name=role)))
            want_tokens += sum(map(len, reference.image_token_ids(pictures, task=task)))
            assert result.prompt_tokens == want_tokens
    finally:
        await engine.aclose()


async def test_token_budget_splits_batches(vllm_stack, reference):
    """A tiny token budget forces one call per text; results are identical and ordered."""
    config = vllm_stack.model_copy(update={"backend": vllm_stack.backend.model_copy(update={"max_batch_tokens": 16})})
    client = await AsyncClient.direct(config)
    try:
        got = await client.encode_text(TEXTS * 3, task="code", prompt_name="passage", batch_size=7)
    finally:
        await client.aclose()
    want = reference.encode_text(TEXTS * 3, task="code", prompt_name="passage")
    assert got.shape == want.shape
    assert cosines(got, want).min() >= SINGLE_MIN


async def test_too_long_input(fp16_client, reference, vllm_stack):
    long_text = "token " * (vllm_stack.vllm.max_model_len + 50)
    with pytest.raises(InputTooLongError) as info:
        await fp16_client.encode_text(["short", long_text], task="retrieval")
    assert "input[1]" in str(info.value) and info.value.param == "input[1]"
    got = await fp16_client.encode_text([long_text], task="retrieval", truncate=True)
    want = reference.encode_text([long_text], task="retrieval", max_length=vllm_stack.vllm.max_model_len)
    assert cosines(got, want).min() >= SINGLE_MIN


async def test_client_errors_send_nothing(demo_source, prepared_dir, tmp_path):
    """With no backend listening, bad requests still fail with their own clear error: nothing was sent."""
    from vllm_stack import demo_config

    client = await AsyncClient.direct(demo_config(demo_source, prepared_dir, tmp_path))
    try:
        with pytest.raises(InvalidRequestError, match="unknown task"):
            await client.encode_text(["hi"], task="summarize")
        with pytest.raises(InvalidRequestError, match="dimensions=7"):
            await client.encode_text(["hi"], truncate_dim=7)
        with pytest.raises(InvalidRequestError, match="return_multivector"):
            await client.encode_text(["hi"], truncate_dim=64, return_multivector=True)
        with pytest.raises(InvalidRequestError, match=r"input\[1\]"):
            await client.encode_image([png_bytes(make_image(32, 32)), b"not an image"])
        with pytest.raises(InvalidRequestError, match=r"input\[0\]"):
            await client.encode_text([""])
    finally:
        await client.aclose()
