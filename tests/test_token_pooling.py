"""Compact multi-vectors: hierarchical token pooling and binary rows, against real vLLM.

The pooled rows the router serves must equal the published algorithm (an independent,
literal implementation below: scipy's linkage over the rows of ``1 - E Eᵀ`` as observations)
and colpali-engine's own ``HierarchicalTokenPooler``, both applied to the unpooled rows the
same stack returns. Packed rows are the sign bits of the pooled rows; rerank over pooled
documents is MaxSim over those rows; the client's binary MaxSim is Hamming similarity.
"""

from __future__ import annotations

import base64
import itertools

import httpx
import numpy as np
import pytest
import torch
from colpali_engine.compression.token_pooling import HierarchicalTokenPooler
from images_util import make_image, png_bytes
from scipy.cluster.hierarchy import fcluster, linkage

from jv4_vllm import Client
from jv4_vllm.core.scoring import maxsim, maxsim_scores
from jv4_vllm.core.token_pooling import ROW_WINDOW, pool_rows, pool_tokens

MATCH = 0.9999
TASK = "code.passage"  # any adapter does; the pooling is the same
WORDS = ("ledger", "invoice", "quarter", "revenue", "margin", "forecast", "audit", "cash", "asset", "equity",
         "a", "the", "of", "to", "and", "in", "rose", "fell", "by", "percent")
LONG_TEXT = " ".join(WORDS[(i * 7 + i // 3) % len(WORDS)] for i in range(330))  # about 1,000 demo tokens
IMAGES = [base64.b64encode(png_bytes(make_image(w, h, seed=s))).decode("ascii")
          for w, h, s in ((224, 168, 1), (300, 200, 2))]


# --- references -------------------------------------------------------------------------


def published_pooling(rows: np.ndarray, factor: int) -> np.ndarray:
    """The algorithm as published, written out literally (O(n³)): observations are the rows of
    1 - E Eᵀ, Ward linkage on their Euclidean distances, maxclust, normalised cluster means."""
    e = np.asarray(rows, dtype=np.float32)
    if factor == 1:
        return e
    labels = fcluster(linkage(1 - e @ e.T, metric="euclidean", method="ward"), t=max(len(e) // factor, 1),
                      criterion="maxclust")
    means = np.stack([e[labels == k].mean(axis=0) for k in np.unique(labels)])
    return means / np.linalg.norm(means, axis=1, keepdims=True)


def colpali_pooling(rows: np.ndarray, factor: int) -> np.ndarray:
    pooled = HierarchicalTokenPooler().pool_embeddings([torch.from_numpy(np.array(rows, np.float32))],
                                                       pool_factor=factor)
    return pooled[0].numpy()


def assert_same_rows(got: np.ndarray, want: np.ndarray) -> None:
    """Same count, and every row matched by a distinct row at cosine >= MATCH."""
    assert got.shape == want.shape, (got.shape, want.shape)
    sims = got.astype(np.float64) @ want.astype(np.float64).T
    best = sims.argmax(axis=1)
    assert len(set(best.tolist())) == len(best), "two pooled rows matched the same reference row"
    assert sims.max(axis=1).min() >= MATCH, sims.max(axis=1).min()


def hamming_maxsim(query_bits: np.ndarray, doc_bits: np.ndarray) -> float:
    """Numpy reference: unpacked bits, per pair 1 - 2 * differing / P, best per query row, summed."""
    q, d = np.unpackbits(query_bits, axis=1), np.unpackbits(doc_bits, axis=1)
    differing = (q[:, None, :] != d[None, :, :]).sum(axis=2)
    return float((1 - 2 * differing.min(axis=1) / q.shape[1]).sum())


# --- unit tests (no vLLM) ---------------------------------------------------------------


def _unit_rows(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(max(n // 12, 2), 128))
    rows = base[rng.integers(0, len(base), n)] + 0.6 * rng.normal(size=(n, 128))  # clustered, like tokens
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("n,factor", [(2, 2), (7, 3), (300, 2), (301, 3), (500, 4), (64, 64), (5, 9)])
def test_pooling_equals_the_published_algorithm(n: int, factor: int) -> None:
    rows = _unit_rows(n, seed=n + factor)
    got = pool_tokens(rows, factor)
    assert_same_rows(got, published_pooling(rows, factor))
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


def test_factor_one_and_single_rows_are_unchanged() -> None:
    rows = _unit_rows(40, seed=3)
    assert pool_rows(rows, 1) is rows
    assert np.array_equal(pool_tokens(rows[:1], 4), rows[:1])


def test_long_inputs_are_pooled_window_by_window() -> None:
    rows = _unit_rows(700, seed=5)  # three windows of 233, 234 and 233 rows
    got = pool_rows(rows, 3, window=300)
    bounds = [0, 233, 467, 700]
    want = np.concatenate([published_pooling(rows[a:b], 3) for a, b in itertools.pairwise(bounds)])
    assert got.shape == (77 + 78 + 77, 128)
    assert np.allclose(got, want, atol=1e-5)  # windows in order, each in cluster-label order
    long = _unit_rows(ROW_WINDOW + 2, seed=6)  # the default window: two halves of 1,025 rows
    assert np.array_equal(pool_rows(long, 4), np.concatenate(
        [pool_tokens(long[:ROW_WINDOW // 2 + 1], 4), pool_tokens(long[ROW_WINDOW // 2 + 1:], 4)]))


def test_binary_maxsim_is_hamming_similarity() -> None:
    rng = np.random.default_rng(7)
    query = rng.normal(size=(9, 128)).astype(np.float32)
    docs = [rng.normal(size=(n, 128)).astype(np.float32) for n in (1, 30, 200)]
    query_bits = np.packbits(query > 0, axis=1)
    for doc in docs:
        ubinary = np.packbits(doc > 0, axis=1)
        binary = (ubinary.astype(np.int16) - 128).astype(np.int8)  # the service's binary encoding
        want = hamming_maxsim(query_bits, ubinary)
        assert maxsim(query, ubinary) == pytest.approx(want, abs=1e-9)  # float query: binarised
        assert maxsim(query, binary) == pytest.approx(want, abs=1e-9)
        assert maxsim(query_bits, binary) == pytest.approx(want, abs=1e-9)
        assert maxsim((query_bits.astype(np.int16) - 128).astype(np.int8), ubinary) == pytest.approx(want, abs=1e-9)
    with pytest.raises(ValueError):
        maxsim(query[:, :64], np.packbits(docs[1] > 0, axis=1))


# --- against the live stack -------------------------------------------------------------


def embed(router_url: str, inputs: list, **fields: object) -> dict:
    body = {"input": inputs, "task": TASK, "return_multivector": True, **fields}
    response = httpx.post(f"{router_url}/v1/embeddings", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def rows_of(router_url: str, inputs: list, **fields: object) -> list[np.ndarray]:
    data = embed(router_url, inputs, embedding_type="base64", **fields)["data"]
    return [np.frombuffer(base64.b64decode(d["embeddings"]), "<f4").reshape(d["shape"]) for d in data]


@pytest.fixture(scope="module")
def unpooled(router_url: str) -> list[np.ndarray]:
    rows = rows_of(router_url, [{"text": LONG_TEXT}, *({"image": i} for i in IMAGES)])
    assert 900 <= len(rows[0]) <= 1200, len(rows[0])
    return rows


@pytest.mark.vllm
@pytest.mark.parametrize("factor", [2, 3])
def test_served_pooling_equals_the_references(router_url: str, unpooled: list[np.ndarray], factor: int) -> None:
    pooled = rows_of(router_url, [{"text": LONG_TEXT}, *({"image": i} for i in IMAGES)],
                     multivector_pool_factor=factor)
    for got, rows in zip(pooled, unpooled):
        assert len(got) == max(len(rows) // factor, 1)
        assert_same_rows(got, published_pooling(rows, factor))
        assert_same_rows(got, colpali_pooling(rows, factor))


@pytest.mark.vllm
@pytest.mark.parametrize("kind", ["binary", "ubinary"])
def test_packed_rows_are_the_sign_bits_of_the_pooled_rows(router_url: str, kind: str) -> None:
    inputs = [{"text": LONG_TEXT[:2000]}, {"image": IMAGES[0]}]
    floats = rows_of(router_url, inputs, multivector_pool_factor=2)
    packed = embed(router_url, inputs, multivector_pool_factor=2, embedding_type=kind)["data"]
    for rows, item in zip(floats, packed):
        bits = np.packbits(rows > 0, axis=1).astype(np.int16)
        assert np.array_equal(np.asarray(item["embeddings"]), bits - 128 if kind == "binary" else bits)


@pytest.mark.vllm
def test_pooling_combines_with_late_chunking_and_dense(router_url: str) -> None:
    chunks = [LONG_TEXT[:800], LONG_TEXT[800:1600], LONG_TEXT[1600:2000]]
    whole = rows_of(router_url, chunks, late_chunking=True)
    pooled = embed(router_url, chunks, late_chunking=True, multivector_pool_factor=3, return_dense=True,
                   dimensions=128)["data"]
    dense = embed(router_url, chunks, late_chunking=True, return_multivector=False, dimensions=128)["data"]
    for rows, item, single in zip(whole, pooled, dense):  # each chunk pooled on its own rows
        assert_same_rows(np.asarray(item["embeddings"], np.float32), published_pooling(rows, 3))
        a, b = np.asarray(item["embedding"]), np.asarray(single["embedding"])
        assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) >= 0.99999


@pytest.mark.vllm
def test_rerank_over_pooled_documents_is_maxsim_over_pooled_rows(router_url: str) -> None:
    query = "revenue rose by percent in the quarter"
    documents = [LONG_TEXT[:1200], LONG_TEXT[1500:2100], {"image": IMAGES[1]}]
    response = httpx.post(f"{router_url}/v1/rerank", timeout=300, json={
        "query": query, "documents": documents, "task": "code", "multivector_pool_factor": 2,
        "return_documents": False})
    assert response.status_code == 200, response.text
    got = {r["index"]: r["relevance_score"] for r in response.json()["results"]}
    query_rows = rows_of(router_url, [query], task="code.query")[0]  # queries stay unpooled
    docs = rows_of(router_url, [d if isinstance(d, dict) else {"text": d} for d in documents],
                   multivector_pool_factor=2)
    want = maxsim_scores(query_rows, docs)
    assert [got[i] for i in range(len(documents))] == pytest.approx(want.tolist(), abs=1e-4)
    unpooled = httpx.post(f"{router_url}/v1/rerank", timeout=300,
                          json={"query": query, "documents": documents[:2], "task": "code"}).json()["results"]
    assert {r["index"]: r["relevance_score"] for r in unpooled} != {i: got[i] for i in (0, 1)}


@pytest.mark.vllm
def test_client_pool_factor_and_binary_maxsim(router_url: str) -> None:
    with Client(router_url) as client:
        pooled = client.encode_text([LONG_TEXT[:1500]], task="code", prompt_name="passage",
                                    return_multivector=True, pool_factor=3)
        query = client.encode_text("quarter revenue", task="code", return_multivector=True)
        hits = client.rerank("quarter revenue", [LONG_TEXT[:1500], LONG_TEXT[1500:]], task="code", pool_factor=3)
    served = rows_of(router_url, [{"text": LONG_TEXT[:1500]}], multivector_pool_factor=3)[0]
    assert_same_rows(pooled[0], served)
    assert hits[[h.index for h in hits].index(0)].relevance_score == pytest.approx(maxsim(query, served), abs=1e-4)
    packed = np.asarray(embed(router_url, [{"text": LONG_TEXT[:1500]}], multivector_pool_factor=3,
                              embedding_type="binary")["data"][0]["embeddings"], dtype=np.int8)
    assert maxsim(query, packed) == pytest.approx(
        hamming_maxsim(np.packbits(query > 0, axis=1), (packed.astype(np.int16) + 128).astype(np.uint8)))


@pytest.mark.vllm
@pytest.mark.parametrize("path,body", [
    ("/v1/embeddings", {"input": "x", "return_multivector": True, "multivector_pool_factor": 0}),
    ("/v1/embeddings", {"input": "x", "return_multivector": True, "multivector_pool_factor": -2}),
    ("/v1/embeddings", {"input": "x", "return_multivector": True, "multivector_pool_factor": 1.5}),
    ("/v1/embeddings", {"input": "x", "multivector_pool_factor": 2}),
    ("/v1/embeddings", {"input": "x", "return_multivector": True, "multivector_pool_factor": 2, "dimensions": 128}),
    ("/v1/rerank", {"query": "x", "documents": ["y"], "multivector_pool_factor": 0}),
    ("/v1/rerank", {"query": "x", "documents": ["y"], "multivector_pool_factor": 2, "scoring": "dense"}),
])
def test_bad_pool_factors_are_400s_naming_the_field(router_url: str, path: str, body: dict) -> None:
    response = httpx.post(f"{router_url}{path}", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "multivector_pool_factor"
    assert "multivector_pool_factor" in error["message"]


def test_client_refuses_bad_pool_factors() -> None:
    from jv4_vllm.client.aio import _options
    from jv4_vllm.errors import InvalidRequestError

    for factor, multi in ((0, True), (2, False), (True, True)):
        with pytest.raises(InvalidRequestError) as caught:
            _options("retrieval", "query", None, multi, False, pool_factor=factor)  # type: ignore[arg-type]
        assert caught.value.param == "pool_factor"


def test_bench_pooling_row_agrees_with_colpali() -> None:
    from jv4_vllm.bench.pooling import markdown_lines, measure_pooling

    row = measure_pooling([_unit_rows(400, seed=11)], factors=(2, 3), repeats=1)
    assert all(cell["identical_clusters"] for cell in row["factors"].values())
    storage = [{"encoding": "float32", "factor": 1, "rows_per_page": 10.0, "bytes_per_page": 2560.0},
               {"encoding": "binary", "factor": 1, "rows_per_page": 10.0, "bytes_per_page": 80.0}]
    assert "| binary | 1 | 10.0 | 80 | 1/32.0 |" in markdown_lines(row, storage)
