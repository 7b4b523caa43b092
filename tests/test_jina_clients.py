"""Jina's own client libraries, unchanged, against the real router (and vLLM behind it).

LlamaIndex ``JinaEmbedding`` (llama-index-embeddings-jinaai) sends ``encoding_type`` and reads
error messages from ``detail``; LangChain ``JinaEmbeddings`` (langchain-community) sends images
as ``{"bytes": <base64>}``. Both must give the openai SDK's vectors. Also every older image item
shape and ``encoding_type`` on the wire, and the error body both client families read.
"""

from __future__ import annotations

import base64
import inspect
from pathlib import Path

import httpx
import numpy as np
import pytest
from images_util import make_image, png_bytes
from openai import OpenAI

from jv4_vllm.errors import InvalidRequestError, error_from_body

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

MODEL = "jina-embeddings-v4"
TEXTS = ["A cat sleeps on the windowsill.", "Die Katze schläft auf der Fensterbank.", "def add(a, b): return a + b"]
PARITY = 0.9999999


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module")
def image_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("jina-images")
    paths = []
    for i, (w, h) in enumerate([(64, 64), (224, 160)]):
        path = folder / f"image{i}.png"
        path.write_bytes(png_bytes(make_image(w, h, seed=i)))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def openai_client(router_url: str) -> OpenAI:
    return OpenAI(base_url=f"{router_url}/v1", api_key="unused")


def sdk_vectors(client: OpenAI, inputs: list, **extra: object) -> np.ndarray:
    """The openai SDK's vectors (base64 on the wire, decoded by the SDK)."""
    response = client.embeddings.create(model=MODEL, input=inputs, extra_body=extra or None)
    return np.array([item.embedding for item in sorted(response.data, key=lambda d: d.index)], np.float32)


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


# ---- LlamaIndex JinaEmbedding ---------------------------------------------------------------


def llama_embedding(router_url: str, **kwargs: object):
    """JinaEmbedding aimed at the router: a constructor argument where the release has one,
    else the URL its API helper posts to."""
    from llama_index.embeddings.jinaai import JinaEmbedding

    base_url = f"{router_url}/v1"
    if "base_url" in inspect.signature(JinaEmbedding.__init__).parameters:
        return JinaEmbedding(model=MODEL, api_key="unused", base_url=base_url, **kwargs)
    embedding = JinaEmbedding(model=MODEL, api_key="unused", **kwargs)
    embedding._api.api_url = f"{base_url}/embeddings"
    return embedding


def test_llama_index_texts_match_openai_sdk(router_url: str, openai_client: OpenAI) -> None:
    embedding = llama_embedding(router_url, task="retrieval.passage")
    got = np.array(embedding.get_text_embedding_batch(TEXTS), np.float32)
    want = sdk_vectors(openai_client, TEXTS, task="retrieval.passage")
    assert got.shape == want.shape == (3, want.shape[1])
    assert cosines(got, want).min() >= PARITY

    query = llama_embedding(router_url, task="retrieval.query", dimensions=128)
    got_query = np.array(query.get_query_embedding(TEXTS[0]), np.float32)
    want_query = sdk_vectors(openai_client, [TEXTS[0]], task="retrieval.query", dimensions=128)[0]
    assert got_query.shape == (128,)
    assert cosines(got_query, want_query) >= PARITY
    # the same query as a passage is another vector: the task reached the router
    assert cosines(got_query, sdk_vectors(openai_client, [TEXTS[0]], task="retrieval.passage",
                                          dimensions=128)[0]) < 0.9999


async def test_llama_index_async_texts(router_url: str, openai_client: OpenAI) -> None:
    embedding = llama_embedding(router_url, task="text-matching")
    got = np.array(await embedding.aget_text_embedding_batch(TEXTS), np.float32)
    assert cosines(got, sdk_vectors(openai_client, TEXTS, task="text-matching")).min() >= PARITY


def test_llama_index_ubinary_queries(router_url: str, openai_client: OpenAI) -> None:
    """``encoding_queries="ubinary"``: packed sign bits, unpacked by the client to 0/1 per dimension."""
    embedding = llama_embedding(router_url, encoding_queries="ubinary")
    bits = np.array(embedding.get_query_embedding(TEXTS[1]))
    dense = sdk_vectors(openai_client, [TEXTS[1]])[0]
    assert bits.shape == dense.shape
    assert np.array_equal(bits, (dense > 0).astype(bits.dtype))


def test_llama_index_images_match_openai_sdk(router_url: str, openai_client: OpenAI,
                                             image_files: list[Path]) -> None:
    embedding = llama_embedding(router_url)
    got = np.array(embedding.get_image_embedding_batch([str(p) for p in image_files]), np.float32)
    want = sdk_vectors(openai_client, [{"image": b64(p)} for p in image_files])
    assert got.shape == want.shape
    assert cosines(got, want).min() >= PARITY


def test_llama_index_late_chunking(router_url: str, openai_client: OpenAI) -> None:
    """``JinaEmbedding(late_chunking=True)``: the hosted API's flag reaches the router's late chunking."""
    embedding = llama_embedding(router_url, task="retrieval.passage", late_chunking=True)
    got = np.array(embedding.get_text_embedding_batch(TEXTS), np.float32)
    want = vectors(post(router_url, {"input": TEXTS, "task": "retrieval.passage", "late_chunking": True}))
    assert cosines(got, want).min() >= PARITY
    assert cosines(got, sdk_vectors(openai_client, TEXTS, task="retrieval.passage")).min() < 0.9999


def test_llama_index_reads_error_messages(router_url: str) -> None:
    """Refusals reach the user as the client's RuntimeError with our message (it reads ``detail``)."""
    with pytest.raises(RuntimeError, match="dimensions=100 is not supported"):
        llama_embedding(router_url, dimensions=100).get_query_embedding("hello")
    # a remote image goes as {"url": ...}; this server does not fetch URLs
    with pytest.raises(RuntimeError, match=r"input\[0\]: image URLs are disabled"):
        llama_embedding(router_url).get_image_embedding("https://example.com/cat.png")


# ---- LangChain JinaEmbeddings ----------------------------------------------------------------


@pytest.fixture
def langchain_embeddings(router_url: str, monkeypatch: pytest.MonkeyPatch):
    from langchain_community.embeddings import jina

    monkeypatch.setattr(jina, "JINA_API_URL", f"{router_url}/v1/embeddings")
    return jina.JinaEmbeddings(model_name=MODEL, jina_api_key="unused")


def test_langchain_texts_match_openai_sdk(langchain_embeddings, openai_client: OpenAI) -> None:
    want = sdk_vectors(openai_client, TEXTS)
    got = np.array(langchain_embeddings.embed_documents(TEXTS), np.float32)
    assert cosines(got, want).min() >= PARITY
    assert cosines(np.array(langchain_embeddings.embed_query(TEXTS[2]), np.float32), want[2]) >= PARITY


def test_langchain_images_match_openai_sdk(langchain_embeddings, openai_client: OpenAI,
                                           image_files: list[Path]) -> None:
    got = np.array(langchain_embeddings.embed_images([str(p) for p in image_files]), np.float32)
    want = sdk_vectors(openai_client, [{"image": b64(p)} for p in image_files])
    assert got.shape == want.shape
    assert cosines(got, want).min() >= PARITY


def test_langchain_reads_error_messages(langchain_embeddings) -> None:
    with pytest.raises(RuntimeError, match="image URLs are disabled"):
        langchain_embeddings.embed_images(["https://example.com/cat.png"])


# ---- the wire shapes themselves ------------------------------------------------------------


def post(router_url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{router_url}/v1/embeddings", json=body, timeout=120)


def vectors(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([item["embedding"] for item in response.json()["data"]], np.float32)


def test_legacy_image_items_equal_image_items(router_url: str, image_files: list[Path]) -> None:
    data = b64(image_files[1])
    uri = f"data:image/png;base64,{data}"
    want = vectors(post(router_url, {"input": [{"image": data}], "task": "retrieval.passage"}))
    for item in ({"bytes": data}, {"bytes": uri}, {"url": uri}):
        got = vectors(post(router_url, {"input": ["some text", item], "task": "retrieval.passage"}))
        assert got.shape == (2, want.shape[1])
        assert cosines(got[1], want[0]) >= PARITY, item.keys()


@pytest.mark.parametrize(("item", "status", "param", "message"), [
    ({"bytes": "https://example.com/cat.png"}, 400, "input[1].bytes", "not a URL"),
    ({"url": "iVBORw0KGgo="}, 400, "input[1].url", "http(s) URL or a data URI"),
    ({"url": "https://example.com/cat.png"}, 400, "input[1]", "image URLs are disabled"),
    ({"bytes": "not base64!"}, 400, "input[1]", "not valid base64"),
    ({"bytes": "A" * (12 * 2**20)}, 413, "input[1]", "larger than"),
    ({"url": "data:image/png;base64,iVBORw0KGgo=", "bytes": "iVBORw0KGgo="}, 400, "input[1]", '{"url": ...}'),
    ({"bytes": 12}, 400, "input[1].bytes", "string"),
])
def test_legacy_image_items_refused(router_url: str, item: dict, status: int, param: str, message: str) -> None:
    response = post(router_url, {"input": ["fine", item]})
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["param"] == param
    assert message in body["error"]["message"]
    assert body["detail"] == body["error"]["message"]


def test_encoding_type_is_embedding_type(router_url: str) -> None:
    texts = TEXTS[:2]
    dense = vectors(post(router_url, {"input": texts}))
    for kind in ("base64", "binary", "ubinary"):
        via_encoding = post(router_url, {"input": texts, "encoding_type": kind})
        via_embedding = post(router_url, {"input": texts, "embedding_type": kind})
        assert via_encoding.status_code == 200, via_encoding.text
        assert via_encoding.json()["data"] == via_embedding.json()["data"]
    encoded = post(router_url, {"input": texts, "encoding_type": "base64"}).json()["data"]
    decoded = np.array([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in encoded])
    assert np.array_equal(decoded, dense)
    # the same choice under several names must agree
    assert post(router_url, {"input": texts, "encoding_type": "float", "encoding_format": "float"}).status_code == 200
    bad = post(router_url, {"input": texts, "embedding_type": "float", "encoding_type": "base64"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "embedding_type"
    bad = post(router_url, {"input": texts, "encoding_type": "float", "encoding_format": "base64"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "encoding_type"
    assert "contradicts encoding_format" in bad.json()["error"]["message"]
    bad = post(router_url, {"input": texts, "encoding_type": "int4"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "encoding_type"


def test_error_bodies_carry_detail(router_url: str) -> None:
    """Every refusal: OpenAI's error object and the same message as ``detail``; our client still reads it."""
    cases = [
        (post(router_url, {"input": ["x"], "dimensions": 100}), 400),
        (post(router_url, {"input": ["x"], "model": "no-such-model"}), 404),
        (post(router_url, {"input": ["x"], "late_chunkin": True}), 400),
        (httpx.get(f"{router_url}/v1/no-such-route", timeout=30), 404),
        (httpx.get(f"{router_url}/v1/embeddings", timeout=30), 405),
    ]
    for response, status in cases:
        assert response.status_code == status, response.text
        body = response.json()
        assert set(body) == {"error", "detail"}
        assert body["detail"] == body["error"]["message"] and body["detail"]
        error = error_from_body(status, body)
        assert error.message == body["detail"]
    assert isinstance(error_from_body(400, cases[0][0].json()), InvalidRequestError)
