"""``encode_pdf`` uploads a PDF once: the router keeps it for the later page batches.

A counting proxy (tests/fault_upstream.py) stands between the client and the real router and
adds up the bytes the client sends.
"""

from __future__ import annotations

import base64

import numpy as np
import pytest
from fault_upstream import RouterProxy
from test_pdf import PAGE_SIZES, make_pdf
from vllm_stack import InProcessServer, free_port

from jv4_vllm import AsyncClient
from jv4_vllm.router import create_app

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

PAGES = 12
BATCH = 3


@pytest.fixture(scope="module")
def twelve_pages() -> bytes:
    return make_pdf([PAGE_SIZES[i % len(PAGE_SIZES)] for i in range(PAGES)], seed=3)


async def _encode(url: str, pdf: bytes) -> np.ndarray:
    async with AsyncClient(url) as client:
        return await client.encode_pdf(pdf, batch_size=BATCH, show_progress=False)


async def test_a_twelve_page_pdf_in_batches_of_three_is_sent_about_once(router_url: str, twelve_pages: bytes) -> None:
    async with RouterProxy(router_url) as proxy:
        vectors = await _encode(proxy.url, twelve_pages)
    encoded = len(base64.b64encode(twelve_pages))
    sent = sum(len(body) for body in proxy.bodies)
    print(f"\nencode_pdf {PAGES} pages in batches of {BATCH}: {len(proxy.bodies)} requests, {sent} bytes sent for "
          f"{encoded} bytes of base64 PDF ({sent / encoded:.3f}x)")
    assert len(proxy.bodies) == PAGES // BATCH
    assert encoded <= sent <= 1.1 * encoded, (sent, encoded)  # the file once, plus three small references
    async with AsyncClient(router_url) as client:  # all pages in one request, without keep
        want = await client.encode_pdf(twelve_pages, batch_size=PAGES)
    assert vectors.shape == (PAGES, want.shape[1])
    np.testing.assert_allclose(vectors, want, rtol=1e-4, atol=1e-5)


async def test_a_router_that_keeps_nothing_gets_the_bytes_again(vllm_stack, twelve_pages: bytes) -> None:
    limits = vllm_stack.limits.model_copy(update={"max_kept_pdf_bytes": 0})
    config = vllm_stack.model_copy(update={"limits": limits,
                                           "router": vllm_stack.router.model_copy(update={"port": free_port()})})
    async with InProcessServer(create_app(config), config.router.port) as server, RouterProxy(server.url) as proxy:
        vectors = await _encode(proxy.url, twelve_pages)
    encoded = len(base64.b64encode(twelve_pages))
    uploads = [body for body in proxy.bodies if len(body) >= encoded]
    sent = sum(len(body) for body in proxy.bodies)
    print(f"\nencode_pdf, router keeping nothing: {len(proxy.bodies)} requests, {sent / encoded:.3f}x the base64 PDF")
    assert len(uploads) == PAGES // BATCH and len(proxy.bodies) == 2 * PAGES // BATCH - 1  # 3 references refused
    assert vectors.shape[0] == PAGES
