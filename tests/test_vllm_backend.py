"""The vLLM CPU backend itself: raw per-token hidden states equal transformers' on the merged checkpoint."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from images_util import make_image, png_bytes

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

PROMPT = "Query: the quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def merged(prepared_dir):
    task_dir = prepared_dir / "retrieval"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(task_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(task_dir)


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def last_hidden(model, **inputs) -> np.ndarray:  # noqa: ANN001
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    return out.hidden_states[-1][0].float().numpy()


def test_text_hidden_states_match_transformers(vllm_stack, merged, parity_report):
    model, processor = merged
    url = vllm_stack.deployments["retrieval"].urls[0]
    body = {"model": "jina-embeddings-v4-retrieval", "input": PROMPT, "use_activation": False}
    rows = np.array(httpx.post(f"{url}/pooling", json=body, timeout=60).json()["data"][0]["data"], np.float32)
    ids = processor.tokenizer(PROMPT, return_tensors="pt")
    want = last_hidden(model, **ids)
    assert rows.shape == want.shape
    cos = row_cosines(rows, want)
    parity_report.append(("vllm/raw", "retrieval text vs merged HF", "tokens", len(cos), float(cos.min())))
    assert cos.min() >= 0.9999
    # raw rows, not vLLM's default per-token L2 normalisation (the demo's random norm weights vary the norms)
    norms = np.linalg.norm(rows, axis=-1)
    assert norms.std() > 0.01 and abs(norms.mean() - 1.0) > 0.1


def test_image_hidden_states_match_transformers(vllm_stack, merged, parity_report):
    model, processor = merged
    url = vllm_stack.deployments["retrieval"].urls[0]
    image = make_image(160, 96, seed=5)
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()
    body = {"model": "jina-embeddings-v4-retrieval", "use_activation": False, "add_generation_prompt": False,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                      {"type": "text", "text": "Describe the image."}]}]}
    rows = np.array(httpx.post(f"{url}/pooling", json=body, timeout=60).json()["data"][0]["data"], np.float32)
    prompt = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>\n"
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    want = last_hidden(model, **inputs)
    assert rows.shape == want.shape
    cos = row_cosines(rows, want)
    parity_report.append(("vllm/raw", "retrieval image vs merged HF", "tokens", len(cos), float(cos.min())))
    assert cos.min() >= 0.9999
