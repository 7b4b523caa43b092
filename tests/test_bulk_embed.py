"""``jv4-vllm embed`` of a mixed corpus (texts, images, a multi-page PDF) on the real router:
Parquet read back with pyarrow equals direct client calls, dense and multi-vector, and the
Qdrant sink (local mode) ranks as our own MaxSim does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from images_util import make_image

from jv4_vllm import Client

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

TEXTS = [f"passage {i}: {topic}" for i, topic in enumerate(
    ["vectors and search", "cooking pasta", "late interaction", "kubernetes jobs", "parquet files",
     "image retrieval", "bulk embedding", "gardening in spring"])]
MIN_COS = 0.9999


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    (root / "media").mkdir()
    rows = [{"id": f"text-{i}", "text": text} for i, text in enumerate(TEXTS)]
    for i in range(3):
        make_image(64 + 16 * i, 56, seed=i).save(root / "media" / f"image-{i}.png")
        rows.append({"id": f"image-{i}", "image": f"media/image-{i}.png"})
    pages = [make_image(200 + 20 * i, 260, seed=20 + i) for i in range(3)]
    pages[0].save(root / "media" / "doc.pdf", format="PDF", save_all=True, append_images=pages[1:])
    rows.insert(4, {"id": "doc", "pdf": "media/doc.pdf"})
    path = root / "corpus.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def embed(corpus: Path, out: Path, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "jv4_vllm.cli", "embed", "-i", str(corpus), "-o", str(out), "--url", url,
            "--task", "retrieval.passage", "--quiet", "--batch-size", "3", "--image-batch-size", "2", *extra]
    done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _rows(path: Path) -> dict[tuple[str, int | None], dict]:
    table = pq.read_table(path)
    return {(row["id"], row["page"]): row for row in table.to_pylist()}


def test_mixed_corpus_to_parquet_dense(router_url, corpus, tmp_path):
    out = tmp_path / "dense.parquet"
    done = embed(corpus, out, router_url)
    assert "12 rows done (200: 12)" in done.stderr  # a PDF is one corpus row
    table = pq.read_table(out)
    assert table.schema.names == ["id", "page", "embedding"]
    rows = _rows(out)
    assert len(rows) == table.num_rows == len(TEXTS) + 3 + 3  # each PDF page is a row
    assert [rows[("doc", p)]["page"] for p in (1, 2, 3)] == [1, 2, 3]
    media = corpus.parent / "media"
    with Client(router_url) as client:
        texts = client.encode_text(TEXTS, task="retrieval", prompt_name="passage")
        images = client.encode_image([str(media / f"image-{i}.png") for i in range(3)], task="retrieval")
        pages = client.encode_pdf(str(media / "doc.pdf"), task="retrieval")
    for i, vector in enumerate(texts):
        assert _cos(np.asarray(rows[(f"text-{i}", None)]["embedding"]), vector) >= MIN_COS
    for i, vector in enumerate(images):
        assert _cos(np.asarray(rows[(f"image-{i}", None)]["embedding"]), vector) >= MIN_COS
    for p, vector in enumerate(pages, start=1):
        assert _cos(np.asarray(rows[("doc", p)]["embedding"]), vector) >= MIN_COS

    again = embed(corpus, out, router_url)  # a rerun finds everything done
    assert "0 rows done" in again.stderr and "12 already done" in again.stderr
    assert pq.read_table(out).num_rows == table.num_rows


def test_multivector_parquet_and_qdrant_rank_like_maxsim(router_url, corpus, tmp_path):
    from qdrant_client import QdrantClient

    out = tmp_path / "multi.parquet"
    store = tmp_path / "qdrant"
    embed(corpus, out, router_url, "--multivector", "--qdrant", str(store), "--collection", "docs")
    table = pq.read_table(out)
    assert table.schema.field("embeddings").type.value_type.list_size > 0  # list<fixed_size_list<P>>
    rows = _rows(out)
    with Client(router_url) as client:
        texts = client.encode_text(TEXTS, task="retrieval", prompt_name="passage", return_multivector=True)
        query = client.encode_text("searching vectors", task="retrieval", prompt_name="query",
                                   return_multivector=True)
    for i, matrix in enumerate(texts):
        got = np.asarray(rows[(f"text-{i}", None)]["embeddings"])
        assert got.shape == matrix.shape
        assert min(_cos(a, b) for a, b in zip(got, matrix)) >= 0.999

    keys = list(rows)
    maxsim = [float((query @ np.asarray(rows[k]["embeddings"]).T).max(axis=1).sum()) for k in keys]
    want = [keys[i] for i in np.argsort(maxsim)[::-1]]
    qdrant = QdrantClient(path=str(store))
    try:
        hits = qdrant.query_points("docs", query=query.tolist(), using="multi", limit=len(keys),
                                   with_payload=True).points
    finally:
        qdrant.close()
    got = [(hit.payload["id"], hit.payload["page"]) for hit in hits]
    assert got == want
    np.testing.assert_allclose([hit.score for hit in hits], sorted(maxsim, reverse=True), rtol=1e-4)


def test_directory_corpus(router_url, corpus, tmp_path):
    out = tmp_path / "dir.parquet"
    (corpus.parent / "media" / "note.md").write_text("# a note\nabout vectors")
    try:
        embed(corpus.parent / "media", out, router_url)
    finally:
        (corpus.parent / "media" / "note.md").unlink()
    ids = sorted({row["id"] for row in pq.read_table(out).to_pylist()})
    assert ids == ["doc.pdf", "image-0.png", "image-1.png", "image-2.png", "note.md"]


def test_sigkill_between_row_groups_then_rerun(router_url, tmp_path):
    import contextlib
    import os
    import signal
    import time

    corpus = tmp_path / "texts.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"t{i}", "text": f"text number {i} " * 4}) + "\n" for i in range(160)))
    out = tmp_path / "out.parquet"
    args = [sys.executable, "-m", "jv4_vllm.cli", "embed", "-i", str(corpus), "-o", str(out), "--url", router_url,
            "--task", "retrieval.passage", "--quiet", "--batch-size", "2", "--row-group-size", "4",
            "--max-concurrency", "2", "--initial-concurrency", "1"]
    child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # not there yet, or caught mid-append
            if pq.read_metadata(out).num_rows >= 12:
                break
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    ids = pq.read_table(out).column("id").to_pylist()
    assert sorted(ids) == sorted(f"t{i}" for i in range(160))  # no duplicates, no gaps
    assert " 0 already done" not in done.stderr


def test_refused_inputs_beyond_the_queue_are_each_reported(router_url, tmp_path):
    """More refused batches than the job has room for queued requests: each batch is split to find
    its inputs at fault, every one of them reported, the good rows written (the split must not wait
    for room that queued requests hold; before the split went inline, this job hung)."""
    too_long = "word " * 6000  # over the demo stack's 4,096 tokens
    rows = [{"id": f"row-{i}", "text": too_long if i % 4 else f"short passage {i}"} for i in range(24)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out.parquet"
    done = embed(corpus, out, router_url, "--max-concurrency", "2", "--initial-concurrency", "1")
    assert "24 rows done (200: 6, 400: 18)" in done.stderr
    assert sorted(pq.read_table(out).column("id").to_pylist()) == sorted(f"row-{i}" for i in range(0, 24, 4))
    errors = [json.loads(line) for line in (tmp_path / "out.parquet.errors.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in errors) == sorted(f"row-{i}" for i in range(24) if i % 4)
    assert all(e["status"] == 400 and e["error"]["param"] == "input[0]" for e in errors)


def test_an_option_the_service_refuses_stops_the_job(router_url, corpus, tmp_path):
    """--dimensions the model does not have: every request would be refused, so the job stops at the
    first answer with the service's message instead of sending every input alone."""
    args = [sys.executable, "-m", "jv4_vllm.cli", "embed", "-i", str(corpus), "-o", str(tmp_path / "out.parquet"),
            "--url", router_url, "--task", "retrieval.passage", "--quiet", "--dimensions", "5000"]
    done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "refuses this job's dimensions" in done.stderr and "5000" in done.stderr
    assert "Traceback" not in done.stderr
