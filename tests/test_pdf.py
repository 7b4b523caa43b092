"""PDF inputs end to end: pages rendered at render_dpi, embedded like images, grouped per input.

The PDF is made here with Pillow (one distinct picture per page, pages of different sizes);
each page's vector must equal the service's embedding of the same page rendered by the test
itself with pypdfium2 at the router's render_dpi, and the reference encoder's.
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import httpx
import numpy as np
import pypdfium2
import pytest
from images_util import make_image, png_bytes
from PIL import Image
from vllm_stack import InProcessServer, free_port

from jv4_vllm import Client
from jv4_vllm.core.pdf import format_pages, parse_pages
from jv4_vllm.errors import InvalidRequestError
from jv4_vllm.router import create_app

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

PAGE_SIZES = [(200, 260), (260, 200), (180, 180), (240, 300)]  # points (72 dpi)
MIN_COS = 0.9999
MAX_PDF_BYTES = 256 * 1024  # of the small router; the test PDF is about 90 kB


def make_pdf(sizes: list[tuple[int, int]] = PAGE_SIZES, seed: int = 0, resolution: float = 72.0) -> bytes:
    pictures = [make_image(w, h, seed=seed + i) for i, (w, h) in enumerate(sizes)]
    buffer = io.BytesIO()
    pictures[0].save(buffer, format="PDF", save_all=True, append_images=pictures[1:], resolution=resolution)
    return buffer.getvalue()


def encrypted_pdf(data: bytes) -> bytes:
    """``data`` plus an incremental update that declares standard encryption: no empty password opens it."""
    size = int(re.findall(rb"/Size (\d+)", data)[-1])
    root = re.findall(rb"/Root (\d+ \d+ R)", data)[-1]
    previous = int(re.findall(rb"startxref\s+(\d+)", data)[-1])
    obj = (b"%d 0 obj\n<< /Filter /Standard /V 1 /R 2 /O <%s> /U <%s> /P -4 >>\nendobj\n"
           % (size, b"ab" * 32, b"cd" * 32))
    xref_at = len(data) + len(obj)
    tail = (b"xref\n%d 1\n%010d 00000 n \ntrailer\n<< /Size %d /Root %s /Prev %d /Encrypt %d 0 R "
            b"/ID [<%s><%s>] >>\nstartxref\n%d\n%%%%EOF\n"
            % (size, len(data), size + 1, root, previous, size, b"00" * 16, b"00" * 16, xref_at))
    return data + obj + tail


def empty_pdf() -> bytes:
    document = pypdfium2.PdfDocument.new()
    buffer = io.BytesIO()
    document.save(buffer)
    document.close()
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def render_pages(data: bytes, dpi: float) -> list[Image.Image]:
    document = pypdfium2.PdfDocument(data)
    try:
        return [document[i].render(scale=dpi / 72.0).to_pil().convert("RGB") for i in range(len(document))]
    finally:
        document.close()


def cos(a, b) -> np.ndarray:
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def embed(router_url: str, inputs: list, **fields) -> dict:
    response = httpx.post(f"{router_url}/v1/embeddings", timeout=300,
                          json={"input": inputs, "task": "retrieval.passage", **fields})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def pdf() -> bytes:
    return make_pdf()


@pytest.fixture(scope="module")
def rendered(pdf: bytes, vllm_stack) -> list[Image.Image]:
    return render_pages(pdf, vllm_stack.limits.render_dpi)


# --- the shape of answers, and equality with the page images ------------------------------

def test_pages_in_order_equal_their_images(router_url, pdf, rendered, reference, parity_report):
    body = embed(router_url, ["a text before", {"pdf": b64(pdf)}, {"text": "a text after"}])
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert [d["object"] for d in body["data"]] == ["embedding", "pages", "embedding"]
    item = body["data"][1]
    assert [p["page"] for p in item["pages"]] == [1, 2, 3, 4]
    assert all(p["object"] == "embedding" for p in item["pages"])
    pages = np.array([p["embedding"] for p in item["pages"]])

    images = embed(router_url, [{"image": b64(png_bytes(page))} for page in rendered])
    image_vectors = np.array([d["embedding"] for d in images["data"]])
    similarity = pages @ image_vectors.T
    assert list(similarity.argmax(axis=1)) == [0, 1, 2, 3]  # page i is image i, in order
    page_cos = cos(pages, image_vectors)
    parity_report.append(("router/pdf", "page vs its image", "single", len(pages), float(page_cos.min())))
    assert page_cos.min() >= MIN_COS

    want = reference.encode_image(rendered, task="retrieval")
    ref_cos = cos(pages, want)
    parity_report.append(("router/pdf", "page vs reference", "single", len(pages), float(ref_cos.min())))
    assert ref_cos.min() >= MIN_COS
    assert body["usage"]["prompt_tokens"] > 0


def test_multivector_keeps_one_matrix_per_page(router_url, pdf, rendered, parity_report):
    body = embed(router_url, [{"pdf": b64(pdf)}], return_multivector=True, embedding_type="base64")
    pages = body["data"][0]["pages"]
    assert [p["page"] for p in pages] == [1, 2, 3, 4] and all(p["object"] == "embeddings" for p in pages)
    matrices = [np.frombuffer(base64.b64decode(p["embeddings"]), "<f4").reshape(p["shape"]) for p in pages]
    images = embed(router_url, [{"image": b64(png_bytes(page))} for page in rendered], return_multivector=True)
    worst = 1.0
    for matrix, item in zip(matrices, images["data"]):
        want = np.array(item["embeddings"])
        assert matrix.shape == want.shape
        worst = min(worst, float(cos(matrix, want).min()))
    parity_report.append(("router/pdf", "page rows vs image rows", "multi", len(matrices), worst))
    assert worst >= MIN_COS


@pytest.mark.parametrize(("selection", "want"), [("2-3", [2, 3]), ("4,1", [1, 4]), ("3-", [3, 4]),
                                                 ("-2", [1, 2]), (" 2 , 2-2 ", [2])])
def test_page_selection(router_url, pdf, selection, want):
    full = embed(router_url, [{"pdf": b64(pdf)}])["data"][0]["pages"]
    chosen = embed(router_url, [{"pdf": f"data:application/pdf;base64,{b64(pdf)}", "pages": selection}])
    pages = chosen["data"][0]["pages"]
    assert [p["page"] for p in pages] == want
    for page in pages:
        assert cos(page["embedding"], full[page["page"] - 1]["embedding"])[0] >= MIN_COS


def test_page_selection_parser():
    assert parse_pages(None, 3, 0) == (1, 2, 3)
    assert parse_pages("1-3,7", 9, 0) == (1, 2, 3, 7)
    assert parse_pages([5, 1, 5], 9, 0) == (1, 5)
    assert format_pages([1, 2, 3, 7, 9, 10]) == "1-3,7,9-10"
    for bad in ["", "0", "3-1", "x", "1,,2", "-", "10"]:
        with pytest.raises(InvalidRequestError) as info:
            parse_pages(bad, 9, 4)
        assert info.value.param == "input[4].pages"


# --- bad PDFs and limits ---------------------------------------------------------------------

def _post(url: str, inputs: list) -> httpx.Response:
    return httpx.post(f"{url}/v1/embeddings", json={"input": inputs}, timeout=120)


@pytest.mark.parametrize(("name", "value", "pages", "param", "code"), [
    ("not base64", "this is not base64!", None, "input[1]", "invalid_base64"),
    ("not a pdf", b64(b"hello, I am a text file"), None, "input[1]", "invalid_pdf"),
    ("no pages after a malformed one", b64(empty_pdf()), None, "input[1]", "empty_pdf"),
    ("truncated", b64(make_pdf()[:300]), None, "input[1]", "invalid_pdf"),
    ("encrypted", b64(encrypted_pdf(make_pdf())), None, "input[1]", "encrypted_pdf"),
    ("no pages after an encrypted one", b64(empty_pdf()), None, "input[1]", "empty_pdf"),
    ("page past the end", b64(make_pdf()), "9", "input[1].pages", "invalid_pages"),
    ("backwards range", b64(make_pdf()), "3-1", "input[1].pages", "invalid_pages"),
    ("page zero", b64(make_pdf()), "0-2", "input[1].pages", "invalid_pages"),
    ("empty string", "", None, "input[1]", None),
    ("data uri without base64", "data:application/pdf,%PDF", None, "input[1]", "invalid_pdf"),
])
def test_bad_pdfs_are_400_naming_the_input(router_url, name, value, pages, param, code):
    item = {"pdf": value} if pages is None else {"pdf": value, "pages": pages}
    response = _post(router_url, ["fine text", item])
    assert response.status_code == 400, (name, response.text)
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"], (name, error)
    if code is not None:
        assert error["code"] == code, (name, error)


def test_errors_after_a_pdf_name_the_input_not_the_page(router_url, pdf):
    response = _post(router_url, ["fine", {"pdf": b64(pdf)}, "   "])  # the engine sees the blank as item 5
    assert response.status_code == 400 and response.json()["error"]["param"] == "input[2]", response.text
    late = httpx.post(f"{router_url}/v1/embeddings", timeout=120,
                      json={"input": ["a", {"pdf": b64(pdf), "pages": "2-3"}, "b"], "late_chunking": True})
    assert late.status_code == 400 and late.json()["error"]["param"] == "input[1]", late.text


def test_malformed_pdf_items_are_400(router_url):
    for item, param in [({"pdf": b64(make_pdf()), "pages": 3}, "input[0].pages"),
                        ({"pdf": 5}, "input[0].pdf"),
                        ({"pdf": b64(make_pdf()), "image": "x"}, "input[0]"),
                        ({"pdf": b64(make_pdf()), "page": "1"}, "input[0].page")]:
        response = _post(router_url, [item])
        assert response.status_code == 400, (item.keys(), response.text)
        assert response.json()["error"]["param"] == param


@pytest.fixture(scope="module")
async def tight_router(vllm_stack):
    """A router over the same deployments with small PDF limits."""
    limits = vllm_stack.limits.model_copy(update={"max_pdf_bytes": MAX_PDF_BYTES, "max_pdf_pages_per_request": 3})
    config = vllm_stack.model_copy(update={
        "limits": limits, "router": vllm_stack.router.model_copy(update={"port": free_port()})})
    async with InProcessServer(create_app(config), config.router.port) as server:
        yield server.url


async def test_limits_are_413(tight_router):
    async with httpx.AsyncClient(base_url=tight_router, timeout=300) as http:
        async def post(inputs: list) -> httpx.Response:
            return await http.post("/v1/embeddings", json={"input": inputs})

        four = b64(make_pdf())
        too_many = await post([{"pdf": four}])
        assert too_many.status_code == 413 and too_many.json()["error"]["param"] == "input[0]"
        assert too_many.json()["error"]["code"] == "too_many_pages"
        within = await post([{"pdf": four, "pages": "2-4"}])  # the limit counts selected pages
        assert within.status_code == 200 and len(within.json()["data"][0]["pages"]) == 3

        two = b64(make_pdf(PAGE_SIZES[:2]))
        over_request = await post(["text", {"pdf": two}, {"pdf": two}])  # 4 pages over one request
        assert over_request.status_code == 413 and over_request.json()["error"]["param"] == "input[2]"

        noise = np.random.default_rng(1).integers(0, 256, (900, 900, 3), dtype=np.uint8)
        large = io.BytesIO()
        Image.fromarray(noise, "RGB").save(large, format="PDF", quality=100)
        assert len(large.getvalue()) > MAX_PDF_BYTES
        too_big = await post([{"pdf": b64(large.getvalue())}])
        assert too_big.status_code == 413 and too_big.json()["error"]["param"] == "input[0]"

        huge_page = b64(make_pdf([(100, 100)], resolution=1.0))  # 100 inches square: 14400x14400 px at 144 dpi
        wall = await post([{"pdf": huge_page}])
        assert wall.status_code == 413 and "pixels" in wall.json()["error"]["message"]
        assert (await http.get("/health")).status_code == 200


# --- the client ---------------------------------------------------------------------------

def test_client_encode_pdf(router_url, pdf, tmp_path: Path):
    path = tmp_path / "doc.pdf"
    path.write_bytes(pdf)
    full = embed(router_url, [{"pdf": b64(pdf)}])["data"][0]["pages"]
    want = np.array([p["embedding"] for p in full])
    with Client(router_url) as client:
        vectors = client.encode_pdf(path, batch_size=3, show_progress=False)  # two requests: pages 1-3, 4
        assert vectors.shape == want.shape
        assert cos(vectors, want).min() >= MIN_COS
        some = client.encode_pdf(pdf, pages="2,4", task="retrieval")
        assert cos(some, want[[1, 3]]).min() >= MIN_COS
        multi = client.encode_pdf(b64(pdf), return_multivector=True, pages=[1, 3], batch_size=1)
        assert len(multi) == 2 and all(m.ndim == 2 for m in multi)
        with pytest.raises(InvalidRequestError) as info:
            client.encode_pdf(b"not a pdf")
        assert info.value.param == "input[0]"


async def test_direct_client_renders_in_process(vllm_stack, router_url, pdf):
    from jv4_vllm import AsyncClient

    full = embed(router_url, [{"pdf": b64(pdf)}])["data"][0]["pages"]
    client = await AsyncClient.direct(vllm_stack)
    try:
        vectors = await client.encode_pdf(pdf, pages="1-2")
    finally:
        await client.aclose()
    assert cos(vectors, np.array([p["embedding"] for p in full[:2]])).min() >= MIN_COS
