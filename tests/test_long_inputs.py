"""Long inputs and big batches through the real router on real vLLM: parity with the reference
while /health keeps answering, and one request of 1,100 small images that must succeed."""

from __future__ import annotations

import asyncio
import base64

import httpx
import numpy as np
import pytest

from images_util import make_image, png_bytes

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

MIN_COS = 0.9999
MIN_ROW_COS = 0.999


def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def long_texts(vllm_stack, reference) -> list[str]:  # noqa: ANN001
    """Texts that fill the deployment's whole window (several thousand tokens on the demo deployments)."""
    words = "Long documents are embedded whole: retrieval over reports, contracts and manuals.".split()
    texts = []
    for shift in range(3):
        text = " ".join(words[(i + shift) % len(words)] for i in range(2 * vllm_stack.vllm.max_model_len))
        ids = reference.text_token_ids([text], task="retrieval", prompt_name="passage",
                                       max_length=vllm_stack.vllm.max_model_len)[0]
        assert len(ids) == vllm_stack.vllm.max_model_len  # the window is full
        texts.append(text)
    return texts


async def _poll_health(client: httpx.AsyncClient, stop: asyncio.Event, answers: list[int]) -> None:
    while not stop.is_set():
        answers.append((await client.get("/health")).status_code)
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("multivector", [False, True], ids=["single", "multi"])
async def test_long_texts_at_parity_while_health_answers(router_url, vllm_stack, reference, parity_report,
                                                         multivector):
    texts = long_texts(vllm_stack, reference)
    max_length = vllm_stack.vllm.max_model_len
    body = {"input": texts, "task": "retrieval.passage", "truncate": True, "return_multivector": multivector,
            "embedding_type": "float"}
    stop, answers = asyncio.Event(), []
    async with httpx.AsyncClient(base_url=router_url, timeout=600) as client:
        poller = asyncio.create_task(_poll_health(client, stop, answers))
        responses = await asyncio.gather(*(client.post("/v1/embeddings", json=body) for _ in range(4)))
        stop.set()
        await poller
    assert answers and set(answers) == {200}
    want = reference.encode_text(texts, task="retrieval", prompt_name="passage", max_length=max_length,
                                 return_multivector=multivector)
    for response in responses:
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        if multivector:
            rows = [np.asarray(d["embeddings"], np.float32) for d in data]
            assert [r.shape for r in rows] == [w.shape for w in want]
            worst = min(float(cos(r, w).min()) for r, w in zip(rows, want))
            assert worst >= MIN_ROW_COS
        else:
            worst = float(cos(np.asarray([d["embedding"] for d in data]), want).min())
            assert worst >= MIN_COS
    parity_report.append(("router", f"retrieval.passage {max_length}-token", "multi" if multivector else "single",
                          len(texts), worst))


async def test_one_request_of_1100_small_images_succeeds(router_url, reference):
    images = [make_image(32 + i % 5, 32, seed=i % 7) for i in range(1100)]
    payload = [{"image": base64.b64encode(png_bytes(image)).decode("ascii")} for image in images]
    async with httpx.AsyncClient(base_url=router_url, timeout=900) as client:
        response = await client.post("/v1/embeddings", json={"input": payload, "task": "retrieval",
                                                              "embedding_type": "float"})
    assert response.status_code == 200, response.text[:500]
    data = response.json()["data"]
    assert [d["index"] for d in data] == list(range(1100))
    distinct = {(i % 5, i % 7): i for i in range(1100)}  # the images repeat: check each distinct one
    picks = sorted(distinct.values())
    want = reference.encode_image([images[i] for i in picks], task="retrieval")
    got = np.asarray([data[i]["embedding"] for i in picks])
    assert cos(got, want).min() >= MIN_COS
