"""The router over real vLLM deployments: the openai SDK and Jina-style requests, against the reference."""

from __future__ import annotations

import base64
import httpx
import numpy as np
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from images_util import make_image, png_bytes

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

TEXTS = ["How do vision language models embed images?", "Ein kurzer deutscher Satz.", "def f(x): return x * 2"]
TASKS = {"retrieval.query": ("retrieval", "query"), "retrieval.passage": ("retrieval", "passage"),
         "text-matching": ("text-matching", "query"), "code.query": ("code", "query"),
         "code.passage": ("code", "passage")}
MIN_COS = 0.9999


def cos(a, b) -> np.ndarray:  # noqa: ANN001
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="session")
def openai_client(router_url):
    return OpenAI(base_url=f"{router_url}/v1", api_key="unused")


@pytest.mark.parametrize("task", list(TASKS))
def test_openai_sdk_matches_reference(task, openai_client, reference, parity_report):
    name, role = TASKS[task]
    want = reference.encode_text(TEXTS, task=name, prompt_name=role)
    # default: the SDK asks for base64 and decodes float32 itself
    got = openai_client.embeddings.create(model="jina-embeddings-v4", input=TEXTS, extra_body={"task": task})
    vectors = np.array([d.embedding for d in got.data])
    assert [d.index for d in got.data] == list(range(len(TEXTS)))
    assert got.usage.prompt_tokens > 0 and got.usage.total_tokens == got.usage.prompt_tokens
    parity_report.append(("router/openai", f"{task} text", "single", len(TEXTS), float(cos(vectors, want).min())))
    assert cos(vectors, want).min() >= MIN_COS
    floats = openai_client.embeddings.create(model="jina-embeddings-v4", input=TEXTS, encoding_format="float",
                                             extra_body={"task": task})
    assert cos(np.array([d.embedding for d in floats.data]), want).min() >= MIN_COS
    dim = reference.matryoshka_dims[1]
    small = openai_client.embeddings.create(model="jina-embeddings-v4", input=TEXTS, dimensions=dim,
                                            extra_body={"task": task})
    small_vectors = np.array([d.embedding for d in small.data])
    assert small_vectors.shape == (len(TEXTS), dim)
    assert cos(small_vectors, reference.encode_text(TEXTS, task=name, prompt_name=role, truncate_dim=dim)).min() >= MIN_COS


def test_adapter_model_name_selects_task(openai_client, reference):
    got = openai_client.embeddings.create(model="jina-embeddings-v4-code", input=TEXTS[2])
    want = reference.encode_text([TEXTS[2]], task="code", prompt_name="query")
    assert cos(got.data[0].embedding, want)[0] >= MIN_COS


def test_jina_style_mixed_inputs_and_multivector(router_url, reference):
    image = make_image(200, 120, seed=3)
    b64 = base64.b64encode(png_bytes(image)).decode()
    body = {"model": "jina-embeddings-v4", "task": "retrieval.passage",
            "input": [{"text": TEXTS[0]}, {"image": b64}, {"image": f"data:image/png;base64,{b64}"}, TEXTS[1]]}
    single = httpx.post(f"{router_url}/v1/embeddings", json=body, timeout=120).json()
    assert [d["index"] for d in single["data"]] == [0, 1, 2, 3]
    want_text = reference.encode_text([TEXTS[0], TEXTS[1]], task="retrieval", prompt_name="passage")
    want_image = reference.encode_image([image], task="retrieval")[0]
    assert cos(single["data"][0]["embedding"], want_text[0])[0] >= MIN_COS
    assert cos(single["data"][1]["embedding"], want_image)[0] >= MIN_COS
    assert cos(single["data"][2]["embedding"], want_image)[0] >= MIN_COS
    assert cos(single["data"][3]["embedding"], want_text[1])[0] >= MIN_COS

    multi = httpx.post(f"{router_url}/v1/embeddings", json={**body, "return_multivector": True}, timeout=120).json()
    want_multi_text = reference.encode_text([TEXTS[0]], task="retrieval", prompt_name="passage",
                                            return_multivector=True)[0]
    want_multi_image = reference.encode_image([image], task="retrieval", return_multivector=True)[0]
    item0, item1 = multi["data"][0], multi["data"][1]
    assert item0["object"] == "embeddings"
    rows0, rows1 = np.array(item0["embeddings"]), np.array(item1["embeddings"])
    assert rows0.shape == want_multi_text.shape and rows1.shape == want_multi_image.shape
    assert cos(rows0, want_multi_text).min() >= 0.999 and cos(rows1, want_multi_image).min() >= 0.999

    packed = httpx.post(f"{router_url}/v1/embeddings",
                        json={**body, "return_multivector": True, "embedding_type": "base64"}, timeout=120).json()
    entry = packed["data"][1]
    decoded = np.frombuffer(base64.b64decode(entry["embeddings"]), "<f4").reshape(entry["shape"])
    np.testing.assert_allclose(decoded, rows1, atol=1e-6)


@pytest.mark.parametrize("kind", ["binary", "ubinary", "base64"])
def test_embedding_types(kind, router_url):
    body = {"model": "jina-embeddings-v4", "input": TEXTS, "task": "retrieval.query"}
    floats = np.array([d["embedding"] for d in httpx.post(f"{router_url}/v1/embeddings", json=body).json()["data"]])
    data = httpx.post(f"{router_url}/v1/embeddings", json={**body, "embedding_type": kind}).json()["data"]
    bits = np.packbits(floats > 0, axis=-1)
    if kind == "base64":
        decoded = np.array([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in data])
        np.testing.assert_allclose(decoded, floats, atol=1e-6)
    elif kind == "ubinary":
        got = np.array([d["embedding"] for d in data])
        assert got.shape == (len(TEXTS), floats.shape[1] // 8) and got.min() >= 0
        np.testing.assert_array_equal(got, bits)
    else:
        got = np.array([d["embedding"] for d in data])
        assert got.min() >= -128 and got.max() <= 127
        np.testing.assert_array_equal(got, bits.astype(np.int16) - 128)


def test_models_health_ready(router_url):
    models = httpx.get(f"{router_url}/v1/models").json()
    ids = {m["id"] for m in models["data"]}
    assert {"jina-embeddings-v4", "jina-embeddings-v4-retrieval", "jina-embeddings-v4-text-matching",
            "jina-embeddings-v4-code"} <= ids
    assert httpx.get(f"{router_url}/health").status_code == 200
    assert httpx.get(f"{router_url}/ready").status_code == 200


def scrape(router_url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics by (name, labels)."""
    text = httpx.get(f"{router_url}/metrics").text
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_metrics_count_what_happened(router_url, vllm_stack):
    before = scrape(router_url)
    good = httpx.post(f"{router_url}/v1/embeddings",
                      json={"input": TEXTS[:2], "task": "code.passage", "model": "jina-embeddings-v4"}).json()
    bad = httpx.post(f"{router_url}/v1/embeddings", json={"input": "a", "task": "code.query", "dimensions": 3})
    assert bad.status_code == 400
    after = scrape(router_url)

    def grew(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after[key] - before.get(key, 0.0)

    assert grew("jv4_inputs_total", task="code", kind="text") == 2
    assert grew("jv4_prompt_tokens_total", task="code") == good["usage"]["prompt_tokens"] > 0
    assert grew("jv4_requests_total", route="/v1/embeddings", task="code", status="200") == 1
    assert grew("jv4_request_duration_seconds_count", route="/v1/embeddings", task="code") == 2
    assert grew("jv4_errors_total", route="/v1/embeddings", task="code", status="400",
                type="invalid_request_error") == 1
    for task, deployment in vllm_stack.deployments.items():
        assert after[("jv4_task_ready", frozenset({"task": task}.items()))] == 1
        for url in deployment.urls:
            assert after[("jv4_backend_healthy", frozenset({"task": task, "replica": url}.items()))] == 1
