"""Visual document search in a few lines: PDF pages -> jina-embeddings-v4 multi-vectors -> Qdrant (MaxSim).

    python scripts/visual_search.py --router http://127.0.0.1:8080 --pdf report.pdf --query "quarterly revenue"

Every page of the PDF is rendered and embedded by the service (one multi-vector per page,
passage role), stored in a Qdrant collection whose multi-vectors compare with MAX_SIM, and
the query (query role) returns the best pages. Qdrant runs in local mode (in memory, or on
disk with --qdrant-path); point --qdrant-url at a server instead. Without --pdf a small
demo PDF is written first. Needs the ``visual-search`` extra (qdrant-client).

``--pool-factor N`` indexes token-pooled pages (about 1/N of the rows, see
docs/compact-multivectors.md); ``--storage`` first prints what each choice costs on these
pages: rows and bytes per page at factors 1, 2, 3, 4 and as binary rows, and the on-disk size
of the same collection in Qdrant (local mode). Quality retention cannot be measured on the
random demo weights; the published figures are cited in the docs.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from qdrant_client import QdrantClient, models

from jv4_vllm import Client

TASK = "retrieval"  # the adapter the walk-through embeds with (--task)
DEMO_PAGES = [
    "Quarterly revenue grew 12% on strong cloud subscriptions; operating margin reached 31%.",
    "The solar array produces 4.2 MWh per day in summer and 1.1 MWh in winter.",
    "Recipe: whisk two eggs with flour and milk, rest the batter, fry thin pancakes.",
    "Network diagram: the router forwards requests to three vLLM deployments, one per task.",
]


def demo_pdf(path: Path) -> Path:
    """A few pages of text, one topic each (A5 at 72 dpi)."""
    pages = []
    for number, text in enumerate(DEMO_PAGES, start=1):
        page = Image.new("RGB", (420, 595), "white")
        draw = ImageDraw.Draw(page)
        draw.text((30, 30), f"Page {number}", fill="black")
        draw.multiline_text((30, 70), "\n".join(textwrap.wrap(text, 48)), fill="black", spacing=8)
        pages.append(page)
    buffer = io.BytesIO()
    pages[0].save(buffer, format="PDF", save_all=True, append_images=pages[1:], resolution=72.0)
    path.write_bytes(buffer.getvalue())
    return path


def index_pdf(client: Client, store: QdrantClient, collection: str, pdf: Path, pool_factor: int = 1) -> int:
    """One point per page: its multi-vector (token-pooled by ``pool_factor``), page number and file as payload."""
    pages = client.encode_pdf(pdf, task=TASK, return_multivector=True, show_progress=True,
                              pool_factor=pool_factor)
    return store_pages(store, collection, pdf, pages)


def store_pages(store: QdrantClient, collection: str, pdf: Path, pages: list[np.ndarray]) -> int:
    if store.collection_exists(collection):
        store.delete_collection(collection)
    store.create_collection(collection, vectors_config=models.VectorParams(
        size=pages[0].shape[1], distance=models.Distance.DOT,  # rows are unit length: dot = cosine
        multivector_config=models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM)))
    store.upsert(collection, points=[
        models.PointStruct(id=number, vector=rows.tolist(), payload={"page": number, "file": str(pdf)})
        for number, rows in enumerate(pages, start=1)])
    return len(pages)


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def storage_table(client: Client, pdf: Path, factors: tuple[int, ...] = (1, 2, 3, 4)) -> list[str]:
    """What each choice costs on these pages: rows, payload bytes and Qdrant's on-disk bytes per page."""
    lines = ["| rows stored as | rows per page | bytes per page | Qdrant on disk per page |", "|---|---|---|---|"]
    for factor in factors:
        pages = client.encode_pdf(pdf, task=TASK, return_multivector=True, pool_factor=factor)
        rows = float(np.mean([len(p) for p in pages]))
        with tempfile.TemporaryDirectory() as folder:
            store = QdrantClient(path=folder)
            store_pages(store, "pages", pdf, pages)
            store.close()
            disk = _disk_bytes(Path(folder)) / len(pages)
        lines.append(f"| float32, factor {factor} | {rows:.1f} | {rows * pages[0].shape[1] * 4:.0f} | {disk:.0f} |")
        if factor == 1:
            binary = rows * pages[0].shape[1] / 8  # packed sign bits: embedding_type binary / ubinary
            lines.append(f"| binary (sign bits), factor 1 | {rows:.1f} | {binary:.0f} | - |")
    return lines


def search(client: Client, store: QdrantClient, collection: str, query: str, top: int) -> list[tuple[int, float]]:
    """(page, MaxSim score) of the best pages for a text query."""
    rows = client.encode_text(query, task=TASK, prompt_name="query", return_multivector=True)
    hits = store.query_points(collection, query=rows.tolist(), limit=top, with_payload=True).points
    return [(int(hit.payload["page"]), float(hit.score)) for hit in hits]  # type: ignore[index]


def main(argv: list[str] | None = None) -> int:
    global TASK
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--router", default="http://127.0.0.1:8080", help="jv4_vllm router URL")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--pdf", type=Path, help="PDF to index (default: a small demo PDF)")
    parser.add_argument("--query", action="append", help="text query (repeatable)")
    parser.add_argument("--top", type=int, default=3)
    parser.add_argument("--collection", default="pages")
    parser.add_argument("--qdrant-path", help="local Qdrant storage directory (default: in memory)")
    parser.add_argument("--qdrant-url", help="a Qdrant server instead of local mode")
    parser.add_argument("--task", default=TASK, help="adapter: retrieval (default), code or text-matching")
    parser.add_argument("--pool-factor", type=int, default=1, help="token pooling of the pages (1: every row)")
    parser.add_argument("--storage", action="store_true", help="first print rows and bytes per page per choice")
    args = parser.parse_args(argv)
    TASK = args.task
    pdf = args.pdf or demo_pdf(Path("visual_search_demo.pdf"))
    queries = args.query or ["How much did revenue grow?", "How do I make pancakes?"]
    store = (QdrantClient(url=args.qdrant_url) if args.qdrant_url
             else QdrantClient(path=args.qdrant_path) if args.qdrant_path else QdrantClient(":memory:"))
    with Client(args.router, api_key=args.api_key) as client:
        if args.storage:
            print("\n".join(storage_table(client, pdf)))
            print("(quality retention cannot be measured on random demo weights: see the published figures)\n")
        count = index_pdf(client, store, args.collection, pdf, args.pool_factor)
        print(f"indexed {count} pages of {pdf}" + (f" (pool factor {args.pool_factor})" if args.pool_factor > 1 else ""))
        for query in queries:
            print(f"\nquery: {query}")
            for rank, (page, score) in enumerate(search(client, store, args.collection, query, args.top), start=1):
                print(f"  {rank}. page {page}  maxsim {score:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
