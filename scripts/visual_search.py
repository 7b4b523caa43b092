"""Visual document search in a few lines: PDF pages -> jina-embeddings-v4 multi-vectors -> Qdrant (MaxSim).

    python scripts/visual_search.py --router http://127.0.0.1:8080 --pdf report.pdf --query "quarterly revenue"

Every page of the PDF is rendered and embedded by the service (one multi-vector per page,
passage role), stored in a Qdrant collection whose multi-vectors compare with MAX_SIM, and
the query (query role) returns the best pages. Qdrant runs in local mode (in memory, or on
disk with --qdrant-path); point --qdrant-url at a server instead. Without --pdf a small
demo PDF is written first. Needs the ``visual-search`` extra (qdrant-client).
"""

from __future__ import annotations

import argparse
import io
import sys
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw
from qdrant_client import QdrantClient, models

from jv4_vllm import Client

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


def index_pdf(client: Client, store: QdrantClient, collection: str, pdf: Path) -> int:
    """One point per page: its multi-vector, with the page number and file as payload."""
    pages = client.encode_pdf(pdf, task="retrieval", return_multivector=True, show_progress=True)
    if store.collection_exists(collection):
        store.delete_collection(collection)
    store.create_collection(collection, vectors_config=models.VectorParams(
        size=pages[0].shape[1], distance=models.Distance.DOT,  # rows are unit length: dot = cosine
        multivector_config=models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM)))
    store.upsert(collection, points=[
        models.PointStruct(id=number, vector=rows.tolist(), payload={"page": number, "file": str(pdf)})
        for number, rows in enumerate(pages, start=1)])
    return len(pages)


def search(client: Client, store: QdrantClient, collection: str, query: str, top: int) -> list[tuple[int, float]]:
    """(page, MaxSim score) of the best pages for a text query."""
    rows = client.encode_text(query, task="retrieval", prompt_name="query", return_multivector=True)
    hits = store.query_points(collection, query=rows.tolist(), limit=top, with_payload=True).points
    return [(int(hit.payload["page"]), float(hit.score)) for hit in hits]  # type: ignore[index]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--router", default="http://127.0.0.1:8080", help="jv4_vllm router URL")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--pdf", type=Path, help="PDF to index (default: a small demo PDF)")
    parser.add_argument("--query", action="append", help="text query (repeatable)")
    parser.add_argument("--top", type=int, default=3)
    parser.add_argument("--collection", default="pages")
    parser.add_argument("--qdrant-path", help="local Qdrant storage directory (default: in memory)")
    parser.add_argument("--qdrant-url", help="a Qdrant server instead of local mode")
    args = parser.parse_args(argv)
    pdf = args.pdf or demo_pdf(Path("visual_search_demo.pdf"))
    queries = args.query or ["How much did revenue grow?", "How do I make pancakes?"]
    store = (QdrantClient(url=args.qdrant_url) if args.qdrant_url
             else QdrantClient(path=args.qdrant_path) if args.qdrant_path else QdrantClient(":memory:"))
    with Client(args.router, api_key=args.api_key) as client:
        count = index_pdf(client, store, args.collection, pdf)
        print(f"indexed {count} pages of {pdf}")
        for query in queries:
            print(f"\nquery: {query}")
            for rank, (page, score) in enumerate(search(client, store, args.collection, query, args.top), start=1):
                print(f"  {rank}. page {page}  maxsim {score:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
