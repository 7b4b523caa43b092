"""Dense and multi-vector from one pass (``return_multivector`` + ``return_dense``), against real vLLM.

Both outputs must equal what the two separate requests give, and come from ONE vLLM call,
counted on the replica's own Prometheus counters (engine requests and HTTP ``/pooling`` calls).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable

import httpx
import numpy as np
import pytest
from images_util import make_image, png_bytes
from openai import OpenAI

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

SAME = 0.9999999
TASK = "code"  # the deployment whose counters are read
TEXT = "def mean(xs): return sum(xs) / len(xs)  # the average of a list"
IMAGE = base64.b64encode(png_bytes(make_image(100, 80, seed=3))).decode("ascii")
DIM = 32


def post(router_url: str, body: dict) -> dict:
    response = httpx.post(f"{router_url}/v1/embeddings", json={"task": f"{TASK}.passage", **body}, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def counters(url: str) -> tuple[float, float]:
    """(finished engine requests, answered /pooling HTTP calls) of one vLLM replica."""
    engine = http = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("vllm:request_success_total{"):
            engine += float(line.rsplit(" ", 1)[1])
        elif line.startswith("http_requests_total{") and 'handler="/pooling"' in line:
            http += float(line.rsplit(" ", 1)[1])
    return engine, http


def calls_made(url: str, action: Callable[[], object]) -> tuple[float, float]:
    """Counter increase over ``action`` (at least the calls it made: other traffic only adds)."""
    before = counters(url)
    action()
    after = counters(url)
    for _ in range(50):  # the HTTP counter is bumped after the response is sent
        if after[1] > before[1]:
            break
        time.sleep(0.05)
        after = counters(url)
    time.sleep(0.2)
    after = counters(url)
    return after[0] - before[0], after[1] - before[1]


def fewest_calls(url: str, action: Callable[[], object], attempts: int = 5) -> tuple[float, float]:
    """The smallest increase over a few attempts: other users of the stack can only add to it."""
    return min(calls_made(url, action) for _ in range(attempts))


@pytest.mark.parametrize("item", [TEXT, {"image": IMAGE}], ids=["text", "image"])
def test_both_outputs_equal_the_separate_requests(router_url: str, item: object) -> None:
    both = post(router_url, {"input": [item], "return_multivector": True, "return_dense": True,
                             "dimensions": DIM})["data"][0]
    single = post(router_url, {"input": [item], "dimensions": DIM})["data"][0]
    multi = post(router_url, {"input": [item], "return_multivector": True})["data"][0]
    assert both["object"] == "embeddings" and both["index"] == 0
    assert len(both["embedding"]) == DIM
    assert cos(both["embedding"], single["embedding"]) >= SAME
    rows, want_rows = np.array(both["embeddings"]), np.array(multi["embeddings"])
    assert rows.shape == want_rows.shape
    assert cos(rows, want_rows).min() >= SAME


def test_both_outputs_come_from_one_vllm_call(router_url: str, vllm_stack) -> None:
    url = vllm_stack.deployments[TASK].urls[0]
    body = {"input": [TEXT], "return_multivector": True, "return_dense": True}
    assert fewest_calls(url, lambda: post(router_url, body)) == (1, 1)

    def separately() -> None:
        post(router_url, {"input": [TEXT]})
        post(router_url, {"input": [TEXT], "return_multivector": True})

    assert calls_made(url, separately) >= (2, 2)  # the counters see every call


@pytest.mark.parametrize("kind", ["base64", "binary", "ubinary"])
def test_both_outputs_honour_embedding_type(router_url: str, kind: str) -> None:
    floats = post(router_url, {"input": [TEXT, "x = 1"], "return_multivector": True, "return_dense": True,
                               "dimensions": DIM})["data"]
    encoded = post(router_url, {"input": [TEXT, "x = 1"], "return_multivector": True, "return_dense": True,
                                "dimensions": DIM, "embedding_type": kind})["data"]
    for plain, item in zip(floats, encoded):
        vector, rows = np.array(plain["embedding"], np.float32), np.array(plain["embeddings"], np.float32)
        if kind == "base64":
            assert np.array_equal(np.frombuffer(base64.b64decode(item["embedding"]), "<f4"), vector)
            got_rows = np.frombuffer(base64.b64decode(item["embeddings"]), "<f4").reshape(item["shape"])
            assert np.array_equal(got_rows, rows)
        else:
            offset = -128 if kind == "binary" else 0
            assert np.array_equal(np.array(item["embedding"]), np.packbits(vector > 0).astype(np.int16) + offset)
            assert np.array_equal(np.array(item["embeddings"]),
                                  np.packbits(rows > 0, axis=-1).astype(np.int16) + offset)


def test_both_with_late_chunking_is_one_call(router_url: str, vllm_stack) -> None:
    chunks = ["def mean(xs):", "return sum(xs) / len(xs)", "# the average"]
    url = vllm_stack.deployments[TASK].urls[0]
    result: dict = {}

    def both() -> None:
        result.update(post(router_url, {"input": chunks, "late_chunking": True, "return_multivector": True,
                                        "return_dense": True, "dimensions": DIM}))

    assert fewest_calls(url, both) == (1, 1)
    single = post(router_url, {"input": chunks, "late_chunking": True, "dimensions": DIM})["data"]
    multi = post(router_url, {"input": chunks, "late_chunking": True, "return_multivector": True})["data"]
    for got, want_single, want_multi in zip(result["data"], single, multi):
        assert cos(got["embedding"], want_single["embedding"]) >= SAME
        assert cos(np.array(got["embeddings"]), np.array(want_multi["embeddings"])).min() >= SAME


def test_openai_sdk_reads_a_both_response(router_url: str) -> None:
    """Opting in keeps the OpenAI shape: the SDK still finds each input's single vector in ``embedding``."""
    sdk = OpenAI(base_url=f"{router_url}/v1", api_key="unused")
    response = sdk.embeddings.create(model="jina-embeddings-v4", input=[TEXT], dimensions=DIM,
                                     extra_body={"task": f"{TASK}.passage", "return_multivector": True,
                                                 "return_dense": True})
    single = post(router_url, {"input": [TEXT], "dimensions": DIM})["data"][0]["embedding"]
    assert cos(response.data[0].embedding, single) >= SAME


def test_python_client_both_outputs(router_url: str, vllm_stack) -> None:
    from jv4_vllm import Client
    from jv4_vllm.client import DenseAndMulti

    texts = [TEXT, "x = 1", "print('hi')"]
    want_single = np.array([d["embedding"] for d in post(router_url, {"input": texts, "dimensions": DIM})["data"]])
    want_multi = [np.array(d["embeddings"]) for d in
                  post(router_url, {"input": texts, "return_multivector": True})["data"]]
    with Client(router_url) as client:
        via_router = client.encode_text(texts, task="code", prompt_name="passage", return_multivector=True,
                                        return_dense=True, truncate_dim=DIM, batch_size=2)
        one = client.encode_text(TEXT, task="code", prompt_name="passage", return_multivector=True,
                                 return_dense=True)
    with Client.direct(vllm_stack) as direct:
        in_process = direct.encode_text(texts, task="code", prompt_name="passage", return_multivector=True,
                                        return_dense=True, truncate_dim=DIM)
    for result in (via_router, in_process):
        assert isinstance(result, DenseAndMulti)
        assert result.dense.shape == (3, DIM) and cos(result.dense, want_single).min() >= SAME
        assert len(result.multi) == 3
        for got, want in zip(result.multi, want_multi):
            assert got.shape == want.shape and cos(got, want).min() >= SAME
    assert one.dense.ndim == 1 and one.multi.shape == want_multi[0].shape
