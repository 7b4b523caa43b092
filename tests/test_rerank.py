"""``/v1/rerank`` over real vLLM: scores equal numpy MaxSim / cosine over the service's own
vectors from ``/v1/embeddings``, the ranking equals Qdrant's MAX_SIM ranking of the same
vectors, and bad requests are 4xx naming the field."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from images_util import make_image, png_bytes
from qdrant_client import QdrantClient, models
from test_pdf import make_pdf
from vllm_stack import InProcessServer, free_port

import jv4_vllm
from jv4_vllm import Client
from jv4_vllm.errors import InvalidRequestError
from jv4_vllm.router import create_app

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
QUERY = "Which page shows the quarterly revenue chart?"
TEXTS = ["Quarterly revenue grew by twelve percent.", "A recipe for thin pancakes.",
         "The router forwards requests to vLLM.", "def add(a, b): return a + b"]
IMAGES = [make_image(160, 120, seed=7), make_image(120, 200, seed=8)]
PDF = make_pdf()
PDF_PAGES = 4
REL = 1e-4


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


DOCUMENTS: list = [*TEXTS, *({"image": b64(png_bytes(image))} for image in IMAGES)]


def numpy_maxsim(query: np.ndarray, doc: np.ndarray) -> float:
    return float((query.astype(np.float64) @ doc.astype(np.float64).T).max(axis=1).sum())


def numpy_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def embeddings(router_url: str, inputs: list, task: str, multivector: bool) -> list[np.ndarray]:
    """Vectors of ``inputs`` from /v1/embeddings; a PDF input gives one array per page."""
    body = {"input": inputs, "task": task, "return_multivector": multivector}
    response = httpx.post(f"{router_url}/v1/embeddings", json=body, timeout=300)
    assert response.status_code == 200, response.text
    out: list[np.ndarray] = []
    for item in response.json()["data"]:
        for entry in item.get("pages", [item]):
            out.append(np.array(entry["embeddings"] if multivector else entry["embedding"], dtype=np.float32))
    return out


def rerank(router_url: str, path: str = "/v1/rerank", **body) -> httpx.Response:
    return httpx.post(f"{router_url}{path}", json=body, timeout=300)


def ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def scores_by_index(body: dict) -> dict[int, float]:
    return {r["index"]: r["relevance_score"] for r in body["results"]}


@pytest.mark.parametrize("task", ["retrieval", "code"])
def test_maxsim_scores_equal_numpy_over_embeddings(router_url, task):
    query = embeddings(router_url, [QUERY], f"{task}.query", True)[0]
    docs = embeddings(router_url, DOCUMENTS, f"{task}.passage", True)
    want = [numpy_maxsim(query, doc) for doc in docs]
    body = ok(rerank(router_url, model=f"jina-embeddings-v4-{task}", query=QUERY, documents=DOCUMENTS))
    assert body["model"] == f"jina-embeddings-v4-{task}" and body["usage"]["prompt_tokens"] > 0
    got = scores_by_index(body)
    assert sorted(got) == list(range(len(DOCUMENTS)))
    np.testing.assert_allclose([got[i] for i in range(len(DOCUMENTS))], want, rtol=REL)
    assert [r["index"] for r in body["results"]] == list(np.argsort(-np.array(want), kind="stable"))
    assert jv4_vllm.maxsim(query, docs[0]) == pytest.approx(want[0], rel=1e-5)
    same = ok(rerank(router_url, query=QUERY, documents=DOCUMENTS, task=task))  # task instead of model
    np.testing.assert_allclose([scores_by_index(same)[i] for i in range(len(DOCUMENTS))], want, rtol=REL)


def test_task_changes_the_scores(router_url):
    retrieval = scores_by_index(ok(rerank(router_url, query=QUERY, documents=TEXTS)))  # default: retrieval
    code = scores_by_index(ok(rerank(router_url, query=QUERY, documents=TEXTS, task="code")))
    want = [numpy_maxsim(embeddings(router_url, [QUERY], "retrieval.query", True)[0], doc)
            for doc in embeddings(router_url, TEXTS, "retrieval.passage", True)]
    np.testing.assert_allclose([retrieval[i] for i in range(len(TEXTS))], want, rtol=REL)
    assert max(abs(retrieval[i] - code[i]) for i in range(len(TEXTS))) > 1e-3


def test_dense_scores_equal_cosine(router_url):
    query = embeddings(router_url, [QUERY], "retrieval.query", False)[0]
    docs = embeddings(router_url, DOCUMENTS, "retrieval.passage", False)
    got = scores_by_index(ok(rerank(router_url, query=QUERY, documents=DOCUMENTS, scoring="dense")))
    np.testing.assert_allclose([got[i] for i in range(len(DOCUMENTS))],
                               [numpy_cosine(query, doc) for doc in docs], rtol=REL, atol=1e-6)


def test_image_query(router_url):
    image = {"image": b64(png_bytes(make_image(150, 150, seed=9)))}
    query = embeddings(router_url, [image], "retrieval.query", True)[0]
    docs = embeddings(router_url, DOCUMENTS, "retrieval.passage", True)
    got = scores_by_index(ok(rerank(router_url, query=image, documents=DOCUMENTS)))
    np.testing.assert_allclose([got[i] for i in range(len(DOCUMENTS))],
                               [numpy_maxsim(query, doc) for doc in docs], rtol=REL)


def test_pdf_document_ranks_as_its_best_page(router_url):
    query = embeddings(router_url, [QUERY], "retrieval.query", True)[0]
    pages = embeddings(router_url, [{"pdf": b64(PDF)}], "retrieval.passage", True)
    assert len(pages) == PDF_PAGES
    page_scores = [numpy_maxsim(query, page) for page in pages]
    documents = [TEXTS[0], {"pdf": b64(PDF)}, {"pdf": b64(PDF), "pages": "2-3"}]
    body = ok(rerank(router_url, query=QUERY, documents=documents))
    results = {r["index"]: r for r in body["results"]}
    assert results[1]["page"] == int(np.argmax(page_scores)) + 1
    assert results[1]["relevance_score"] == pytest.approx(max(page_scores), rel=REL)
    assert results[2]["page"] == int(np.argmax(page_scores[1:3])) + 2
    assert "page" not in results[0]
    assert results[1]["document"] == {"pdf": b64(PDF)}


def test_ranking_equals_qdrant_max_sim(router_url):
    documents = [*DOCUMENTS, *({"pdf": b64(PDF), "pages": str(n)} for n in range(1, PDF_PAGES + 1))]
    query = embeddings(router_url, [QUERY], "retrieval.query", True)[0]
    docs = embeddings(router_url, documents, "retrieval.passage", True)
    store = QdrantClient(":memory:")
    store.create_collection("docs", vectors_config=models.VectorParams(
        size=query.shape[1], distance=models.Distance.DOT,
        multivector_config=models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM)))
    store.upsert("docs", points=[models.PointStruct(id=i, vector=doc.tolist()) for i, doc in enumerate(docs)])
    hits = store.query_points("docs", query=query.tolist(), limit=len(docs)).points
    body = ok(rerank(router_url, query=QUERY, documents=documents, return_documents=False))
    assert [r["index"] for r in body["results"]] == [hit.id for hit in hits]
    np.testing.assert_allclose([r["relevance_score"] for r in body["results"]], [hit.score for hit in hits],
                               rtol=REL)


def test_top_n_and_return_documents(router_url):
    full = ok(rerank(router_url, query=QUERY, documents=DOCUMENTS))
    assert len(full["results"]) == len(DOCUMENTS)
    assert [r["document"] for r in full["results"]] == [
        {"text": DOCUMENTS[r["index"]]} if isinstance(DOCUMENTS[r["index"]], str) else DOCUMENTS[r["index"]]
        for r in full["results"]]
    top = ok(rerank(router_url, "/rerank", query=QUERY, documents=DOCUMENTS, top_n=2, return_documents=False))
    assert top["results"] == [{k: v for k, v in r.items() if k != "document"} for r in full["results"][:2]]
    assert len(ok(rerank(router_url, query=QUERY, documents=DOCUMENTS, top_n=100))["results"]) == len(DOCUMENTS)


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"query": QUERY, "documents": []}, 400, "documents"),
    ({"query": QUERY, "documents": ["x"] * 1001}, 413, "documents"),
    ({"query": QUERY, "documents": ["x"], "scoring": "cosine"}, 400, "scoring"),
    ({"documents": ["x"]}, 400, "query"),
    ({"query": QUERY}, 400, "documents"),
    ({"query": "", "documents": ["x"]}, 400, "query"),
    ({"query": {"pdf": b64(PDF)}, "documents": ["x"]}, 400, "query"),
    ({"query": {"image": "not an image"}, "documents": ["x"]}, 400, "query"),
    ({"query": QUERY, "documents": ["x", "  "]}, 400, "documents[1]"),
    ({"query": QUERY, "documents": ["x", {"image": b64(b"nope")}]}, 400, "documents[1]"),
    ({"query": QUERY, "documents": ["x", {"pdf": b64(b"nope")}]}, 400, "documents[1]"),
    ({"query": QUERY, "documents": ["x", {"pdf": b64(PDF), "pages": "7"}]}, 400, "documents[1].pages"),
    ({"query": QUERY, "documents": ["x", {"video": "x"}]}, 400, "documents[1]"),
    ({"query": QUERY, "documents": ["x"], "top_n": 0}, 400, "top_n"),
    ({"query": QUERY, "documents": ["x"], "task": "retrieval.query"}, 400, "task"),
    ({"query": QUERY, "documents": ["x"], "task": "summarize"}, 400, "task"),
    ({"query": QUERY, "documents": ["x"], "model": "jina-embeddings-v4-code", "task": "retrieval"}, 400, "task"),
    ({"query": QUERY, "documents": ["x"], "model": "other-model"}, 404, "model"),
    ({"query": QUERY, "documents": ["x"], "max_chunks_per_doc": 3}, 400, "max_chunks_per_doc"),
])
def test_bad_requests_name_the_field(router_url, body, status, param):
    response = httpx.post(f"{router_url}/v1/rerank", json=body, timeout=120)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


async def test_api_key_guards_the_rerank_alias(vllm_stack, monkeypatch):
    monkeypatch.setenv("JV4_TEST_RERANK_KEYS", "sk-rerank-test")
    router = vllm_stack.router.model_copy(update={"port": free_port(), "api_keys_env": "JV4_TEST_RERANK_KEYS"})
    config = vllm_stack.model_copy(update={"router": router})
    async with InProcessServer(create_app(config), router.port) as server, \
            httpx.AsyncClient(base_url=server.url, timeout=120) as http:
        body = {"query": QUERY, "documents": TEXTS[:2]}
        for path in ("/rerank", "/v1/rerank"):
            assert (await http.post(path, json=body)).status_code == 401
        keyed = await http.post("/rerank", json=body, headers={"Authorization": "Bearer sk-rerank-test"})
        assert keyed.status_code == 200 and len(keyed.json()["results"]) == 2


def test_client_rerank(router_url, vllm_stack, tmp_path: Path):
    pdf_path = tmp_path / "doc.pdf"
    pdf_path.write_bytes(PDF)
    documents = [TEXTS[0], {"image": IMAGES[0]}, pdf_path, {"pdf": PDF, "pages": "1-2"}, IMAGES[1]]
    wire = [TEXTS[0], DOCUMENTS[len(TEXTS)], {"pdf": b64(PDF)}, {"pdf": b64(PDF), "pages": "1-2"},
            DOCUMENTS[len(TEXTS) + 1]]
    want = ok(rerank(router_url, query=QUERY, documents=wire, return_documents=False))["results"]
    with Client(router_url) as client:
        hits = client.rerank(QUERY, documents, top_n=3, return_documents=True)
        assert [(h.index, h.page) for h in hits] == [(r["index"], r.get("page")) for r in want[:3]]
        np.testing.assert_allclose([h.relevance_score for h in hits], [r["relevance_score"] for r in want[:3]],
                                   rtol=REL)
        assert all(h.document is documents[h.index] for h in hits)
        dense = client.rerank({"image": IMAGES[0]}, TEXTS, scoring="dense")
        assert sorted(h.index for h in dense) == list(range(len(TEXTS)))
        with pytest.raises(InvalidRequestError) as info:
            client.rerank(QUERY, [TEXTS[0], {"pdf": b"not a pdf"}])
        assert info.value.param == "documents[1]"
    with Client.direct(vllm_stack) as direct:  # the same scoring in-process
        hits = direct.rerank(QUERY, documents)
        assert [(h.index, h.page) for h in hits] == [(r["index"], r.get("page")) for r in want]
        np.testing.assert_allclose([h.relevance_score for h in hits], [r["relevance_score"] for r in want],
                                   rtol=REL)


def test_visual_search_script_prints_ranked_pages(router_url, tmp_path: Path):
    pdf_path = tmp_path / "doc.pdf"
    pdf_path.write_bytes(PDF)
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "visual_search.py"), "--router", router_url,
                             "--pdf", str(pdf_path), "--query", QUERY, "--top", str(PDF_PAGES)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr
    assert f"indexed {PDF_PAGES} pages" in result.stdout
    printed = [int(line.split("page")[1].split()[0]) for line in result.stdout.splitlines() if ". page " in line]
    documents = [{"pdf": b64(PDF), "pages": str(n)} for n in range(1, PDF_PAGES + 1)]
    want = ok(rerank(router_url, query=QUERY, documents=documents, return_documents=False))["results"]
    assert printed == [r["index"] + 1 for r in want]  # the same order as /v1/rerank over the pages
