"""``jv4-vllm bench bulk``: the bulk jobs against a plain concurrent client, in one run.

The same requests three ways, side by side against one router: a plain client that sends
the prebuilt bodies at a fixed concurrency (swept; the best level is the bar), ``run-batch``
over an OpenAI batch file of those bodies, and ``embed`` over the same passages as a corpus
(plus the pages of a PDF). Items/s of each job and its ratio to the best client, and the
job's peak RSS on a corpus ten times larger (it should stay flat: input and output stream).
The jobs run as the CLI runs them, in a child process (``os.wait4`` gives its peak RSS).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

__all__ = ["bulk_main"]

WORDS = ["vector", "search", "embeds", "passages", "into", "dense", "and", "multi-vector", "spaces", "so", "that", "late", "interaction", "can", "rank", "documents", "pages", "images", "tables", "code", "and", "queries", "across", "languages", "with", "one", "model"]


def _passage(i: int) -> str:
    n = 24 + (i * 7) % 48
    return f"passage {i}: " + " ".join(WORDS[(i * 3 + k * 5) % len(WORDS)] for k in range(n))


def _pdf(pages: int) -> bytes:
    from PIL import Image, ImageDraw

    images = []
    for p in range(pages):
        image = Image.new("RGB", (300, 380), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        for line in range(12):
            draw.text((12, 12 + 28 * line), f"page {p + 1} line {line} {WORDS[(p + line) % len(WORDS)]}", fill=(0, 0, 0))
        images.append(image)
    buffer = io.BytesIO()
    images[0].save(buffer, format="PDF", save_all=True, append_images=images[1:])
    return buffer.getvalue()


def _bodies(passages: int, pages: int, pdf: bytes, args: argparse.Namespace) -> list[tuple[bytes, int]]:
    """(body, items) of every request a job over this corpus sends, built as the job builds them."""
    def body(inputs: list[dict[str, Any]]) -> bytes:
        return json.dumps({"model": args.model, "input": inputs, "task": args.task,
                           "embedding_type": "base64"}).encode()

    out = [(body([{"text": _passage(i)} for i in range(s, min(s + args.batch_size, passages))]),
            min(args.batch_size, passages - s)) for s in range(0, passages, args.batch_size)]
    data = base64.b64encode(pdf).decode()
    for s in range(1, pages + 1, args.image_batch_size):
        last = min(s + args.image_batch_size - 1, pages)
        out.append((body([{"pdf": data, "pages": f"{s}-{last}"}]), last - s + 1))
    return out


def _write_corpus(folder: Path, passages: int, pdf: bytes) -> Path:
    (folder / "doc.pdf").write_bytes(pdf)
    path = folder / "corpus.jsonl"
    with open(path, "w") as fh:
        fh.writelines(json.dumps({"id": f"p{i}", "text": _passage(i)}) + "\n" for i in range(passages))
        fh.write(json.dumps({"id": "doc", "pdf": "doc.pdf"}) + "\n")
    return path


def _write_batch(folder: Path, bodies: list[tuple[bytes, int]]) -> Path:
    path = folder / "batch.jsonl"
    with open(path, "wb") as fh:
        fh.writelines(b'{"custom_id": "r%d", "method": "POST", "url": "/v1/embeddings", "body": ' % k + body + b"}\n" for k, (body, _) in enumerate(bodies))
    return path


async def _client(url: str, bodies: list[tuple[bytes, int]], concurrency: int) -> float:
    """Items/s of a plain closed-loop client: ``concurrency`` workers sending the bodies in turn."""
    queue = list(range(len(bodies)))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits,
                                 headers={"content-type": "application/json"}) as http:
        async def worker() -> None:
            while queue:
                body, _ = bodies[queue.pop()]
                response = await http.post("/v1/embeddings", content=body)
                response.raise_for_status()
                response.read()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return sum(items for _, items in bodies) / seconds


def _job(command: list[str], items: int) -> dict[str, Any]:
    """Run one job as the CLI runs it; its items/s on its own clock and over the whole process."""
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert child.stderr is not None
    stderr = child.stderr.read().decode()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{command[3]} failed: {stderr[-2000:]}")
    summary = [line for line in stderr.splitlines() if "done (" in line][-1]
    seconds = float(re.search(r"; ([\d.]+) s;", summary).group(1))  # type: ignore[union-attr]
    return {"items": items, "seconds": seconds, "items_per_s": items / seconds, "process_seconds": wall,
            "items_per_s_process": items / wall, "peak_rss_mb": usage.ru_maxrss / 1024, "summary": summary}


def _median_job(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median items/s (its own clock)."""
    return sorted(runs, key=lambda run: run["items_per_s"])[len(runs) // 2]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "jv4_vllm.cli", *args]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jv4-vllm bench bulk", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="a running router")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="where bulk.json and bulk.md go")
    p.add_argument("--passages", type=int, default=3000)
    p.add_argument("--pages", type=int, default=24, help="pages of the corpus's PDF")
    p.add_argument("--batch-size", type=int, default=32, help="texts per request (the jobs' default)")
    p.add_argument("--image-batch-size", type=int, default=8, help="PDF pages per request (the jobs' default)")
    p.add_argument("--sweep", default="1,2,4,8,16,32", help="client concurrency levels")
    p.add_argument("--scale", type=int, default=10, help="the RSS run's corpus is this many times larger")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of client, run-batch, embed")
    p.add_argument("--task", default="retrieval.passage")
    p.add_argument("--model", default="jina-embeddings-v4")
    return p.parse_args(list(argv))


def bulk_main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    levels = sorted({int(v) for v in args.sweep.split(",") if v.strip()})
    pdf = _pdf(args.pages)
    items = args.passages + args.pages
    with tempfile.TemporaryDirectory(prefix="jv4-bench-bulk-") as tmp:
        folder = Path(tmp)
        bodies = _bodies(args.passages, args.pages, pdf, args)
        batch, corpus = _write_batch(folder, bodies), _write_corpus(folder, args.passages, pdf)
        asyncio.run(_client(args.url, bodies[: max(levels)], max(levels)))  # warm up connections and caches
        client = {c: asyncio.run(_client(args.url, bodies, c)) for c in levels}
        best = max(client, key=client.__getitem__)
        common = ("--url", args.url, "--quiet")
        rounds: list[dict[str, Any]] = []
        for k in range(args.rounds):  # interleaved, so a busy spell on a shared machine hits all three
            out = folder / f"round-{k}"
            out.mkdir()
            rounds.append({
                "client": asyncio.run(_client(args.url, bodies, best)),
                "run_batch": _job(_cli("run-batch", "-i", str(batch), "-o", str(out / "out.jsonl"), *common), items),
                "embed": _job(_cli("embed", "-i", str(corpus), "-o", str(out / "out.parquet"), "--task", args.task,
                                   *common), items),
            })
        big = folder / "big"
        big.mkdir()
        big_corpus = _write_corpus(big, args.passages * args.scale, pdf)
        embed_big = _job(_cli("embed", "-i", str(big_corpus), "-o", str(big / "out.parquet"), "--task", args.task,
                              *common), args.passages * args.scale + args.pages)
    bar = statistics.median(r["client"] for r in rounds)  # at the best level, beside each job run
    run_batch = _median_job([r["run_batch"] for r in rounds])
    embed = _median_job([r["embed"] for r in rounds])
    report = {
        "passages": args.passages, "pages": args.pages, "items": items, "requests": len(bodies),
        "client_items_per_s": {str(c): v for c, v in client.items()}, "client_best_concurrency": best,
        "client_best_items_per_s": bar, "rounds": rounds,
        "run_batch": run_batch, "embed": embed, "embed_scaled": embed_big, "scale": args.scale,
        "ratio_run_batch": run_batch["items_per_s"] / bar, "ratio_embed": embed["items_per_s"] / bar,
        "ratio_run_batch_process": run_batch["items_per_s_process"] / bar,
        "ratio_embed_process": embed["items_per_s_process"] / bar,
        "rss_growth": embed_big["peak_rss_mb"] / embed["peak_rss_mb"],
        # each round's job against the client run beside it, then the median: the pairs share
        # whatever the machine was doing during that round
        "paired_ratio_run_batch": statistics.median(r["run_batch"]["items_per_s"] / r["client"] for r in rounds),
        "paired_ratio_embed": statistics.median(r["embed"]["items_per_s"] / r["client"] for r in rounds),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bulk.json").write_text(json.dumps(report, indent=2))
    text = _markdown(report)
    (args.out / "bulk.md").write_text(text)
    print(text)
    return 0


def _markdown(r: dict[str, Any]) -> str:
    sweep = ", ".join(f"c={c}: {v:.1f}" for c, v in r["client_items_per_s"].items())
    rows = [
        f"Bulk benchmark: {r['passages']} passages + {r['pages']} PDF pages ({r['requests']} requests)",
        (f"plain client items/s by concurrency: {sweep}; best c={r['client_best_concurrency']} "
         f"(bar: median over {len(r['rounds'])} interleaved rounds {r['client_best_items_per_s']:.1f})"),
        "",
        ("| job | items/s (own clock) | ratio to best client | median of per-round ratios "
         "| items/s (whole process) | ratio | peak RSS MB |"),
        "|---|---|---|---|---|---|---|",
    ]
    for name, key in (("run-batch", "run_batch"), ("embed", "embed")):
        j = r[key]
        rows.append(f"| {name} | {j['items_per_s']:.1f} | {r[f'ratio_{key}']:.3f} | {r[f'paired_ratio_{key}']:.3f} "
                    f"| {j['items_per_s_process']:.1f} | {r[f'ratio_{key}_process']:.3f} | {j['peak_rss_mb']:.0f} |")
    big = r["embed_scaled"]
    rows.append(f"| embed x{r['scale']} corpus | {big['items_per_s']:.1f} | | | | | {big['peak_rss_mb']:.0f} |")
    per_round = "; ".join(f"{k['client']:.0f} / {k['run_batch']['items_per_s']:.0f} / {k['embed']['items_per_s']:.0f}"
                          for k in r["rounds"])
    rows.append("")
    rows.append(f"items/s per round (client / run-batch / embed): {per_round}")
    rows.append("")
    rows.append(f"peak RSS of embed, {r['scale']}x corpus / 1x corpus: {r['rss_growth']:.2f}")
    return "\n".join(rows) + "\n"
