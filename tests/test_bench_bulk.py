"""The bulk benchmark's smoke run on the demo stack: a small corpus through the plain client,
run-batch and embed, and a report that holds every figure the docs quote (not a timing test)."""

from __future__ import annotations

import json
from pathlib import Path

from jv4_vllm.bench.bulk import bulk_main


def test_bulk_benchmark_reports_ratios_and_rss(router_url: str, tmp_path: Path):
    code = bulk_main(["--url", router_url, "--out", str(tmp_path), "--passages", "40", "--pages", "2",
                      "--sweep", "1,2", "--scale", "2", "--rounds", "2"])
    assert code == 0
    report = json.loads((tmp_path / "bulk.json").read_text())
    assert report["items"] == 42 and len(report["rounds"]) == 2
    assert set(report["client_items_per_s"]) == {"1", "2"}
    for key in ("ratio_run_batch", "ratio_embed", "paired_ratio_run_batch", "paired_ratio_embed",
                "ratio_embed_process", "rss_growth"):
        assert report[key] > 0, key
    for job in ("run_batch", "embed", "embed_scaled"):
        assert "0 already done" in report[job]["summary"] and report[job]["peak_rss_mb"] > 0
    assert report["requests"] == 3 and "(200: 3)" in report["run_batch"]["summary"]  # 2 text batches, 1 page batch
    assert "(200: 41)" in report["embed"]["summary"]  # 40 passages and one PDF
    text = (tmp_path / "bulk.md").read_text()
    assert "median of per-round ratios" in text and "items/s per round" in text
