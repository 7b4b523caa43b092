"""The pooling row of the benchmark: token pooling CPU time against colpali-engine, and bytes per page.

For each factor, the router's pooler (:func:`jv4_vllm.core.token_pooling.pool_rows`, what
``multivector_pool_factor`` runs) and colpali-engine's ``HierarchicalTokenPooler`` (the
reference implementation, a dev dependency) pool the SAME rows, fetched unpooled from a
running router, side by side in one process with one BLAS thread each (as the router runs);
CPU time is reported per 1,000 rows, with their ratio, and the clusters are compared (same
row count, every row matched at cosine >= 0.9999). Bytes per page are the multi-vector's
payload on the wire, read from real answers of the router for each factor and for binary.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np

__all__ = ["demo_pages", "markdown_lines", "measure_pooling", "page_bytes", "pooling_main", "pooling_row"]

SAME_ROW = 0.9999


def _rows(router_url: str, inputs: list[dict[str, str]], task: str = "retrieval.passage",
          **fields: Any) -> list[np.ndarray]:
    body = {"input": inputs, "task": task, "return_multivector": True, "embedding_type": "base64",
            **fields}
    response = httpx.post(f"{router_url}/v1/embeddings", json=body, timeout=600)
    response.raise_for_status()
    return [np.frombuffer(base64.b64decode(d["embeddings"]), "<f4").reshape(d["shape"])
            for d in response.json()["data"]]


def _same_clusters(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    sims = a.astype(np.float64) @ b.astype(np.float64).T
    return bool(sims.max(axis=1).min() >= SAME_ROW and len(set(sims.argmax(axis=1).tolist())) == len(a))


def measure_pooling(rows: Sequence[np.ndarray], factors: Sequence[int] = (2, 3), repeats: int = 5) -> dict[str, Any]:
    """CPU ms per 1,000 rows of both poolers at each factor (interleaved), and whether they agree."""
    import torch
    from threadpoolctl import threadpool_limits

    from jv4_vllm.core.token_pooling import pool_rows
    try:
        from colpali_engine.compression.token_pooling import HierarchicalTokenPooler
    except ImportError as exc:  # a dev dependency
        return {"error": f"colpali-engine is not installed ({exc}); pip install 'jv4_vllm[dev]'"}
    reference = HierarchicalTokenPooler()
    total_rows = sum(len(r) for r in rows)
    out: dict[str, Any] = {"inputs": len(rows), "rows": [len(r) for r in rows], "factors": {}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            for factor in factors:
                ours = theirs = 0.0
                same = True
                for _ in range(repeats):
                    for matrix in rows:
                        began = time.process_time()
                        got = pool_rows(matrix, factor)
                        ours += time.process_time() - began
                        began = time.process_time()
                        want = reference.pool_embeddings([torch.from_numpy(np.array(matrix))], pool_factor=factor)[0]
                        theirs += time.process_time() - began
                        same = same and _same_clusters(got, want.numpy())
                scale = 1000.0 / (total_rows * repeats)
                out["factors"][str(factor)] = {
                    "router_cpu_ms_per_1000_rows": ours * 1000 * scale,
                    "colpali_cpu_ms_per_1000_rows": theirs * 1000 * scale,
                    "ratio": ours / theirs if theirs else None,
                    "identical_clusters": same,
                }
    finally:
        torch.set_num_threads(threads)
    return out


def page_bytes(router_url: str, pages: list[dict[str, str]], factors: Sequence[int] = (1, 2, 3, 4),
               task: str = "retrieval.passage") -> list[dict[str, Any]]:
    """Rows and payload bytes per page for each factor (float32) and for binary rows (factor 1),
    from the router's answers: base64 decoded for floats, the packed rows for binary."""
    table = []
    for factor in factors:
        rows = _rows(router_url, pages, task, multivector_pool_factor=factor)
        table.append({"encoding": "float32", "factor": factor, "rows_per_page": float(np.mean([len(r) for r in rows])),
                      "bytes_per_page": float(np.mean([r.nbytes for r in rows]))})
    for factor in (1, max(factors)):
        response = httpx.post(f"{router_url}/v1/embeddings", timeout=600, json={
            "input": pages, "task": task, "return_multivector": True, "embedding_type": "binary",
            "multivector_pool_factor": factor})
        response.raise_for_status()
        packed = [np.asarray(d["embeddings"], dtype=np.int8) for d in response.json()["data"]]
        table.append({"encoding": "binary", "factor": factor, "rows_per_page": float(np.mean([len(p) for p in packed])),
                      "bytes_per_page": float(np.mean([p.nbytes for p in packed]))})
    return table


def markdown_lines(pooling: dict[str, Any], storage: list[dict[str, Any]]) -> list[str]:
    """The pooling row's two tables."""
    if "error" in pooling:
        return [f"Token pooling: {pooling['error']}"]
    title = (f"Token pooling, CPU ms per 1,000 rows (inputs of {pooling['rows']} rows, one BLAS thread, both "
             "poolers side by side in one process on the same rows):")
    lines = [title, "",
             "| factor | router pooler ms | colpali-engine ms | ratio | identical clusters |", "|---|---|---|---|---|"]
    for factor, cell in pooling["factors"].items():
        lines.append(f"| {factor} | {cell['router_cpu_ms_per_1000_rows']:.1f} | {cell['colpali_cpu_ms_per_1000_rows']:.1f} "
                     f"| {cell['ratio']:.3f} | {cell['identical_clusters']} |")
    base = storage[0]["bytes_per_page"]
    lines += ["", "Multi-vector payload per page on the wire:", "",
              "| encoding | factor | rows per page | bytes per page | vs factor 1 float32 |", "|---|---|---|---|---|"]
    for row in storage:
        lines.append(f"| {row['encoding']} | {row['factor']} | {row['rows_per_page']:.1f} | {row['bytes_per_page']:.0f} "
                     f"| 1/{base / row['bytes_per_page']:.1f} |")
    return lines


def demo_pages(count: int = 4) -> list[dict[str, str]]:
    """A few A5 text pages as image inputs (the walk-through's kind of page)."""
    import io

    from PIL import Image, ImageDraw

    pages = []
    for number in range(1, count + 1):
        page = Image.new("RGB", (420, 595), "white")
        draw = ImageDraw.Draw(page)
        draw.text((30, 30), f"Page {number}", fill="black")
        for line in range(12):
            draw.text((30, 70 + 24 * line), f"line {line}: revenue, margin and cash flow of quarter {number}",
                      fill="black")
        buffer = io.BytesIO()
        page.save(buffer, format="PNG")
        pages.append({"image": base64.b64encode(buffer.getvalue()).decode("ascii")})
    return pages


def pooling_row(router_url: str, text: str, factors: Sequence[int] = (2, 3), repeats: int = 5,
                task: str = "retrieval.passage") -> dict[str, Any]:
    """The whole row: rows of ``text`` (about 1,000 tokens) and of demo pages from the router, pooled
    by both poolers; bytes per page on the wire."""
    pages = demo_pages()
    rows = _rows(router_url, [{"text": text}], task)  # the 1,000-row input
    return {"cpu": measure_pooling(rows, factors, repeats), "storage": page_bytes(router_url, pages, task=task)}


def pooling_main(argv: list[str]) -> int:
    """``jv4-vllm bench -- pooling --router-url URL --tokenizer FILE``: the pooling row against a running router."""
    import argparse
    import json
    from pathlib import Path

    from tokenizers import Tokenizer

    from jv4_vllm.bench.long_inputs import long_passage

    p = argparse.ArgumentParser(prog="jv4-vllm bench -- pooling", description=__doc__)
    p.add_argument("--router-url", required=True)
    p.add_argument("--tokenizer", type=Path, required=True, help="the retrieval checkpoint's tokenizer.json")
    p.add_argument("--rows", type=int, default=1000, help="tokens of the text input")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--task", default="retrieval.passage")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    a = p.parse_args(argv)
    text = long_passage(Tokenizer.from_file(str(a.tokenizer)), a.rows - 10)  # the prompt prefix adds a few
    row = pooling_row(a.router_url, text, repeats=a.repeats, task=a.task)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "pooling.json").write_text(json.dumps(row, indent=2), encoding="utf-8")
    print("\n".join(markdown_lines(row["cpu"], row["storage"])))
    return 0
