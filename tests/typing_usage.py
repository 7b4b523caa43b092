"""Checked by ``mypy --strict`` in tests/test_typing.py (never run): what the public client's types promise."""

from __future__ import annotations

from typing import Any, assert_type

import numpy as np

from jv4_vllm import AsyncClient, Client, DenseAndMulti, Embeddings, RerankHit, Retries

Array = np.ndarray[tuple[Any, ...], np.dtype[Any]]  # what a bare np.ndarray annotation means


def blocking(client: Client, flag: bool) -> None:
    assert_type(client.encode_text("a query"), Array)
    assert_type(client.encode_text(["a", "b"], task="retrieval.passage"), Array)
    assert_type(client.encode_text("a", return_multivector=True), Array)
    assert_type(client.encode_text(["a", "b"], return_multivector=True), list[Array])
    assert_type(client.encode_text(["a"], return_multivector=True, return_dense=True), DenseAndMulti)
    assert_type(client.encode_text(["a"], return_multivector=flag), Embeddings | DenseAndMulti)
    assert_type(client.encode_image([b"png"], return_multivector=True), list[Array])
    assert_type(client.encode_image(b"png"), Array)
    assert_type(client.encode_pdf(b"pdf", pages="1-3"), Array)
    assert_type(client.encode_pdf(b"pdf", return_multivector=True), list[Array])
    hits = client.rerank("q", ["d1", "d2"], top_n=1)
    assert_type(hits, list[RerankHit])
    assert_type(hits[0].relevance_score, float)


async def not_blocking(client: AsyncClient) -> None:
    assert_type(await client.encode_text("a query"), Array)
    assert_type(await client.encode_text(["a", "b"], return_multivector=True), list[Array])
    both = await client.encode_text(["a"], return_multivector=True, return_dense=True)
    assert_type(both.dense, Array)
    assert_type(await client.encode_pdf(b"pdf", return_multivector=True), list[Array])
    assert_type(await client.rerank("q", ["d"]), list[RerankHit])


def made() -> None:
    with Client("http://127.0.0.1:8080", retries=Retries(attempts=3, max_wait_s=10)) as client:
        client.encode_text("x")
