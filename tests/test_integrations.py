"""LangChain and LlamaIndex classes over a real router: roles, images, async, retrieval end to end.

Every vector is compared with what ``/v1/embeddings`` returns for the matching ``task``
(the openai SDK for texts, plain HTTP for images). The role checks have teeth: the query
and passage vectors of the same text differ on the demo checkpoint, which is asserted too.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import numpy as np
import pytest
from images_util import make_image, png_bytes
from openai import OpenAI

MODEL = "jina-embeddings-v4"
MIN_COS = 0.9999999
DOCS = [
    "Vision language models embed images by pooling the hidden states of image patches.",
    "A Matryoshka embedding can be truncated to a prefix of its dimensions and normalised again.",
    "def binary_search(items, target): return bisect.bisect_left(items, target)",
    "Der Rhein fließt von den Alpen bis zur Nordsee.",
    "Late interaction scores a query against every token vector of a document.",
]
QUERY = "How are images turned into vectors?"
TASKS = ["retrieval", "code", "text-matching"]

pytestmark = pytest.mark.timeout(600)


def cos(a, b) -> np.ndarray:
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def wire_task(task: str, role: str) -> str:
    return task if task == "text-matching" else f"{task}.{role}"


@pytest.fixture(scope="module")
def openai_client(router_url: str) -> OpenAI:
    return OpenAI(base_url=f"{router_url}/v1", api_key="unused")


@pytest.fixture(scope="module")
def small_dim(prepared_dir: Path) -> int:
    """A Matryoshka size below the full one, read from the prepared checkpoint."""
    return json.loads((prepared_dir / "retrieval" / "jv4.json").read_text())["matryoshka_dims"][1]


def router_texts(client: OpenAI, texts: list[str], task: str, role: str, dimensions: int | None = None) -> np.ndarray:
    extra = {"dimensions": dimensions} if dimensions else {}
    got = client.embeddings.create(model=MODEL, input=texts, extra_body={"task": wire_task(task, role)}, **extra)
    return np.array([d.embedding for d in sorted(got.data, key=lambda d: d.index)])


def router_images(router_url: str, images: list[bytes], task: str = "retrieval") -> np.ndarray:
    body = {"model": MODEL, "input": [{"image": base64.b64encode(data).decode()} for data in images],
            "task": wire_task(task, "passage"), "encoding_format": "float"}
    response = httpx.post(f"{router_url}/v1/embeddings", json=body, timeout=120)
    response.raise_for_status()
    return np.array([d["embedding"] for d in sorted(response.json()["data"], key=lambda d: d["index"])])


def expected_ranking(openai_client: OpenAI, task: str = "retrieval") -> tuple[list[int], np.ndarray]:
    """Document order and cosine scores a store must produce for QUERY: query role vs passage role."""
    query = router_texts(openai_client, [QUERY], task, "query")
    docs = router_texts(openai_client, DOCS, task, "passage")
    scores = cos(docs, query)
    return [int(i) for i in np.argsort(-scores)], scores


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[bytes]]:
    """Two PNG images: the first also as a file."""
    pictures = [png_bytes(make_image(64, 48, seed=1)), png_bytes(make_image(40, 72, seed=2))]
    path = tmp_path_factory.mktemp("images") / "first.png"
    path.write_bytes(pictures[0])
    return path, pictures


# ---- imports: the router and client never need either framework --------------------------------

BLOCKER = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = ("langchain", "langchain_core", "langsmith", "llama_index")
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None
    sys.meta_path.insert(0, Block())
""")


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)


def test_router_and_client_import_without_frameworks() -> None:
    code = BLOCKER + textwrap.dedent("""
        for name in ("langchain_core", "llama_index.core"):
            try:
                __import__(name)
            except ImportError:
                pass
            else:
                raise SystemExit(f"the blocker let {name} through")
        import jv4_vllm, jv4_vllm.client, jv4_vllm.router.app, jv4_vllm.integrations
        from jv4_vllm import AsyncClient, Client
        for module, extra in (("langchain", "langchain"), ("llama_index", "llama-index")):
            try:
                __import__(f"jv4_vllm.integrations.{module}")
            except ImportError as exc:
                assert f"jv4_vllm[{extra}]" in str(exc), str(exc)
            else:
                raise SystemExit(f"jv4_vllm.integrations.{module} imported without its framework")
        print("ok")
    """)
    result = run_python(code)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_router_and_client_do_not_load_frameworks_even_when_installed() -> None:
    code = textwrap.dedent("""
        import sys
        import langchain_core, llama_index.core  # both installed here: the check below is not vacuous
        for name in [m for m in sys.modules if m.startswith(("langchain", "llama_index"))]:
            del sys.modules[name]
        import jv4_vllm.client, jv4_vllm.router.app
        from jv4_vllm import Client
        print(sorted(m for m in sys.modules if m.startswith(("langchain", "llama_index"))))
    """)
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_bad_settings_fail_at_construction() -> None:
    from jv4_vllm.integrations.langchain import JinaV4Embeddings
    from jv4_vllm.integrations.llama_index import JinaV4Embedding

    for make in (JinaV4Embeddings, JinaV4Embedding):
        with pytest.raises(ValueError, match="task"):
            make("http://127.0.0.1:1", task="retrieval.query")
        with pytest.raises(ValueError, match="dimensions"):
            make("http://127.0.0.1:1", dimensions=0)
    secret = JinaV4Embedding("http://127.0.0.1:1", api_key="s3cret")
    assert "s3cret" not in repr(secret) and "s3cret" not in secret.to_json()
    assert "s3cret" not in repr(JinaV4Embeddings("http://127.0.0.1:1", api_key="s3cret"))


# ---- LangChain ------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", TASKS)
@pytest.mark.vllm
def test_langchain_roles_match_router(task: str, router_url: str, openai_client: OpenAI) -> None:
    from jv4_vllm.integrations.langchain import JinaV4Embeddings

    embeddings = JinaV4Embeddings(router_url, task=task, batch_size=2)
    try:
        docs = np.array(embeddings.embed_documents(DOCS))
        query = np.array(embeddings.embed_query(QUERY))
    finally:
        embeddings.close()
    want_docs = router_texts(openai_client, DOCS, task, "passage")
    want_query = router_texts(openai_client, [QUERY], task, "query")
    assert docs.shape == want_docs.shape
    assert cos(docs, want_docs).min() >= MIN_COS
    assert cos(query, want_query).min() >= MIN_COS
    if task != "text-matching":  # the roles really differ, so the checks above can tell them apart
        assert cos(docs, router_texts(openai_client, DOCS, task, "query")).max() < 0.9999


@pytest.mark.vllm
def test_langchain_dimensions(router_url: str, openai_client: OpenAI, small_dim: int) -> None:
    from jv4_vllm.integrations.langchain import JinaV4Embeddings

    embeddings = JinaV4Embeddings(router_url, dimensions=small_dim)
    try:
        docs = np.array(embeddings.embed_documents(DOCS[:2]))
        query = np.array(embeddings.embed_query(QUERY))
    finally:
        embeddings.close()
    assert embeddings.dimensions == small_dim and docs.shape == (2, small_dim) and query.shape == (small_dim,)
    assert cos(docs, router_texts(openai_client, DOCS[:2], "retrieval", "passage", small_dim)).min() >= MIN_COS
    assert cos(query, router_texts(openai_client, [QUERY], "retrieval", "query", small_dim)).min() >= MIN_COS


@pytest.mark.vllm
def test_langchain_images(router_url: str, images: tuple[Path, list[bytes]]) -> None:
    from PIL import Image

    from jv4_vllm.integrations.langchain import JinaV4Embeddings

    path, pictures = images
    embeddings = JinaV4Embeddings(router_url)
    try:
        got = np.array(embeddings.embed_image([str(path), pictures[1], Image.open(io.BytesIO(pictures[1]))]))
    finally:
        embeddings.close()
    want = router_images(router_url, pictures)
    assert got.shape == (3, want.shape[1])
    assert cos(got, want[[0, 1, 1]]).min() >= MIN_COS
    assert embeddings.embed_image([]) == [] and embeddings.embed_documents([]) == []


@pytest.mark.vllm
async def test_langchain_async(router_url: str, openai_client: OpenAI, images: tuple[Path, list[bytes]]) -> None:
    from jv4_vllm.integrations.langchain import JinaV4Embeddings

    embeddings = JinaV4Embeddings(router_url, task="code", batch_size=2)
    try:
        docs = np.array(await embeddings.aembed_documents(DOCS))
        query = np.array(await embeddings.aembed_query(QUERY))
        image = np.array(await embeddings.aembed_image([images[0]]))
    finally:
        await embeddings.aclose()
    assert cos(docs, router_texts(openai_client, DOCS, "code", "passage")).min() >= MIN_COS
    assert cos(query, router_texts(openai_client, [QUERY], "code", "query")).min() >= MIN_COS
    assert cos(image, router_images(router_url, images[1][:1], "code")).min() >= MIN_COS


@pytest.mark.vllm
async def test_langchain_in_memory_store_retrieves(router_url: str, openai_client: OpenAI) -> None:
    from langchain_core.vectorstores import InMemoryVectorStore

    from jv4_vllm.integrations.langchain import JinaV4Embeddings

    order, scores = expected_ranking(openai_client)
    embeddings = JinaV4Embeddings(router_url)
    try:
        store = InMemoryVectorStore(embedding=embeddings)
        store.add_texts(DOCS, ids=[f"doc{i}" for i in range(len(DOCS))])
        found = store.similarity_search_with_score(QUERY, k=len(DOCS))
        assert [doc.id for doc, _ in found] == [f"doc{i}" for i in order]
        assert np.allclose([score for _, score in found], scores[order], atol=1e-6)
        assert store.as_retriever(search_kwargs={"k": 1}).invoke(QUERY)[0].page_content == DOCS[order[0]]

        async_store = InMemoryVectorStore(embedding=embeddings)
        await async_store.aadd_texts(DOCS, ids=[f"doc{i}" for i in range(len(DOCS))])
        found = await async_store.asimilarity_search_with_score(QUERY, k=len(DOCS))
        assert [doc.id for doc, _ in found] == [f"doc{i}" for i in order]
        assert np.allclose([score for _, score in found], scores[order], atol=1e-6)
    finally:
        await embeddings.aclose()


# ---- LlamaIndex -----------------------------------------------------------------------------------

@pytest.mark.vllm
def test_llama_index_roles_and_images_match_router(router_url: str, openai_client: OpenAI,
                                                   images: tuple[Path, list[bytes]]) -> None:
    from jv4_vllm.integrations.llama_index import JinaV4Embedding

    embed_model = JinaV4Embedding(router_url, embed_batch_size=2)  # five documents: three requests
    try:
        docs = np.array(embed_model.get_text_embedding_batch(DOCS))
        one = np.array(embed_model.get_text_embedding(DOCS[0]))
        query = np.array(embed_model.get_query_embedding(QUERY))
        path, pictures = images
        pics = np.array(embed_model.get_image_embedding_batch([str(path), io.BytesIO(pictures[1])]))
        pic = np.array(embed_model.get_image_embedding(str(path)))
    finally:
        embed_model.close()
    want_docs = router_texts(openai_client, DOCS, "retrieval", "passage")
    assert cos(docs, want_docs).min() >= MIN_COS and cos(one, want_docs[0]).min() >= MIN_COS
    assert cos(query, router_texts(openai_client, [QUERY], "retrieval", "query")).min() >= MIN_COS
    assert cos(docs, router_texts(openai_client, DOCS, "retrieval", "query")).max() < 0.9999
    want_pics = router_images(router_url, pictures)
    assert cos(pics, want_pics).min() >= MIN_COS and cos(pic, want_pics[0]).min() >= MIN_COS


@pytest.mark.vllm
async def test_llama_index_async(router_url: str, openai_client: OpenAI, small_dim: int,
                                 images: tuple[Path, list[bytes]]) -> None:
    from jv4_vllm.integrations.llama_index import JinaV4Embedding

    embed_model = JinaV4Embedding(router_url, task="code", dimensions=small_dim, embed_batch_size=2)
    try:
        docs = np.array(await embed_model.aget_text_embedding_batch(DOCS))
        query = np.array(await embed_model.aget_query_embedding(QUERY))
        pics = np.array(await embed_model.aget_image_embedding_batch([str(images[0])]))
    finally:
        await embed_model.aclose()
    assert docs.shape == (len(DOCS), small_dim)
    assert cos(docs, router_texts(openai_client, DOCS, "code", "passage", small_dim)).min() >= MIN_COS
    assert cos(query, router_texts(openai_client, [QUERY], "code", "query", small_dim)).min() >= MIN_COS
    assert pics.shape == (1, small_dim)


@pytest.mark.vllm
async def test_llama_index_vector_store_index_retrieves(router_url: str, openai_client: OpenAI) -> None:
    """Retriever only: no LLM is configured or needed, and nothing reaches for OpenAI."""
    from llama_index.core import Document, VectorStoreIndex

    from jv4_vllm.integrations.llama_index import JinaV4Embedding

    order, scores = expected_ranking(openai_client)
    embed_model = JinaV4Embedding(router_url)
    try:
        index = VectorStoreIndex.from_documents(
            [Document(text=text, id_=f"doc{i}") for i, text in enumerate(DOCS)], embed_model=embed_model)
        retriever = index.as_retriever(similarity_top_k=len(DOCS))
        for found in (retriever.retrieve(QUERY), await retriever.aretrieve(QUERY)):
            assert [hit.node.ref_doc_id for hit in found] == [f"doc{i}" for i in order]
            assert np.allclose([hit.score for hit in found], scores[order], atol=1e-6)
    finally:
        await embed_model.aclose()
