"""Smoke test of the benchmark: a few seconds of every path on the tiny demo checkpoint.

Checks the report's structure and that every path returned the same vectors; timings are
not asserted (they depend on the machine).
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest

from jv4_vllm.bench import main
from jv4_vllm.bench.ceiling import PINNED_KERNEL
from jv4_vllm.bench.settings import ALL_PATHS, MODES, WORKLOADS

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

CONCURRENCY = (1, 2)
MIN_COSINE = 0.9999


@pytest.fixture(scope="module")
def bench_out(demo_source: Path, prepared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    code = main(["--source", str(demo_source), "--prepared", str(prepared_dir), "--out", str(out),
                 "--concurrency", ",".join(map(str, CONCURRENCY)), "--duration", "0.5", "--pool-size", "4",
                 "--reference-batch", "2", "--ceiling", "0.5", "--ceiling-concurrency", "4", "--profile", "1"])
    assert code == 0, (out / "results.md").read_text()
    return out


@pytest.fixture(scope="module")
def report(bench_out: Path) -> dict:
    return json.loads((bench_out / "results.json").read_text())


def test_every_cell_ran(report):
    cells = {(r["path"], r["workload"], r["mode"], r["concurrency"]): r for r in report["results"]}
    expected = [(p, w, "raw", c) for p in ("vllm-json", "vllm-bytes") for w in WORKLOADS for c in CONCURRENCY]
    expected += [(p, w, m, c) for p in ("engine", "router") for w in WORKLOADS for m in MODES for c in CONCURRENCY]
    expected += [("reference", w, m, 1) for w in WORKLOADS for m in MODES]
    assert sorted(cells) == sorted(expected)
    for key, row in cells.items():
        assert row["errors"] == 0, (key, row["first_error"])
        assert row["items"] > 0 and row["items_per_s"] > 0 and row["tokens_per_s"] > 0, key
        assert 0 < row["p50_ms"] <= row["p95_ms"], key
        assert row["others_cpu_cores"] >= 0, key
        if key[0] in ("vllm-json", "vllm-bytes", "router"):
            assert row["wire_bytes_per_item"] > 0, key
        if key[0] == "router":
            assert row["router_cpu_s_per_item"] is not None, key


def test_wire_sizes_are_what_the_formats_imply(report):
    """fp16 bytes carry 2 bytes per hidden value; JSON floats several times that."""
    hidden = report["ceiling"]["hidden_size"]
    for row in report["results"]:
        if row["path"] in ("vllm-bytes", "vllm-json"):
            fp16_bytes = 2 * hidden * row["tokens"] / row["items"]
            factor = 1 if row["path"] == "vllm-bytes" else 3
            assert row["wire_bytes_per_item"] > factor * fp16_bytes, row


def test_ratios_and_ceiling_are_reported(report, bench_out):
    for name in ("router_vs_engine", "router_vs_vllm_bytes", "router_added_p50_ms", "bytes_vs_json",
                 "router_added_p50_ms_replay"):
        assert report["ratios"][name]["value"] is not None, name
    passage = report["ceiling"]["passage"]
    assert passage["body_bytes"] == 2 * report["ceiling"]["hidden_size"] * passage["tokens_per_item"]
    pinned = ["multi, OpenBLAS's own kernel"] if PINNED_KERNEL in os.environ else []
    assert sorted(passage["router"]) == sorted([*MODES, *pinned])
    assert all(variant["blas_kernel"] for variant in passage["router"].values())
    for summary in passage["router"].values():
        assert summary["errors"] == 0 and summary["items"] > 0
        assert summary["hidden_mb_per_cpu_s"] > 0 and summary["tokens_per_cpu_s"] > 0
    assert report["ceiling"]["query"]["added_p50_ms"] is not None
    assert "Samples" in Path(passage["profile"]).read_text()
    assert (bench_out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| router |" in (bench_out / "results.md").read_text()


def test_every_path_returns_the_same_vectors(bench_out, report):
    vectors = np.load(bench_out / "vectors.npz")
    probes = report["settings"]["probe_items"]
    for workload, mode in itertools.product(WORKLOADS, MODES):
        by_path = {path: [vectors[f"{workload}/{mode}/{path}/{i}"] for i in range(probes)] for path in ALL_PATHS}
        for a, b in itertools.combinations(ALL_PATHS, 2):
            for x, y in zip(by_path[a], by_path[b], strict=True):
                x, y = np.atleast_2d(x).astype(np.float64), np.atleast_2d(y).astype(np.float64)
                assert x.shape == y.shape, (workload, mode, a, b)
                cosine = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
                assert cosine.min() >= MIN_COSINE, (workload, mode, a, b, cosine.min())
