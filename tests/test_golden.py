"""Golden files: the format round trip, and ``jv4-vllm verify --golden`` against the real
service, passing on a file that matches and failing, naming the probe, on one altered vector.

Here the golden file is made by our reference encoder on the demo checkpoint
(``scripts/make_golden.py --reference-encoder``); on a machine with the network the same
script makes it with jina-embeddings-v4's own code."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jv4_vllm.oracle.golden import (
    MAX_MULTI_ROWS,
    read_golden,
    sample_rows,
    vectors,
    write_golden,
)
from jv4_vllm.oracle.probes import Probes, image_files
from jv4_vllm.oracle.verify import compare

ROOT = Path(__file__).resolve().parent.parent


def _entries(rng: np.random.Generator) -> list:
    return [vectors("retrieval", "passage", "long", rng.normal(size=64), rng.normal(size=(1500, 16))),
            vectors("code", "", "rgba-png", rng.normal(size=64), rng.normal(size=(40, 16)))]


def test_round_trip_keeps_inputs_and_vectors(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    probes = Probes(texts={"long": "a b c", "over": "d e"}, truncated=frozenset({"over"}),
                    images={"rgba-png": image_files()["rgba-png"]}, pil_images={"pil": b"\x89PNG..."})
    entries = _entries(rng)
    golden = read_golden(write_golden(tmp_path / "g.json", {"max_length": 512, "made_by": "test"}, probes, entries))
    assert golden.probes == probes and golden.max_length == 512
    for want, got in zip(entries, golden.vectors, strict=True):
        assert got.key == want.key and got.multi_rows == want.multi_rows
        np.testing.assert_array_equal(got.single, want.single)
        np.testing.assert_allclose(got.multi, want.multi, rtol=1e-3, atol=1e-3)  # float16 on disk
    assert len(golden.vectors[0].rows) == MAX_MULTI_ROWS and golden.vectors[0].multi_rows == 1500
    assert all(r.ok for r in compare(golden.vectors, entries))


def test_sampled_rows_span_the_whole_multivector() -> None:
    rows = sample_rows(32768)
    assert rows[0] == 0 and rows[-1] == 32767 and len(rows) == MAX_MULTI_ROWS
    assert list(sample_rows(10)) == list(range(10))


def test_compare_names_the_probe_and_the_shortfall() -> None:
    rng = np.random.default_rng(1)
    want = _entries(rng)
    got = _entries(np.random.default_rng(1))
    bent = got[0].single.copy()
    bent[:8] += 0.5
    got[0] = vectors("retrieval", "passage", "long", bent, np.zeros((0, 16)))
    results = {r.probe: r for r in compare(got, want)}
    assert results["rgba-png"].ok
    problem = results["long"].problem
    assert "single" in problem and "short by" in problem
    assert "0 tokens, expected 1500" in problem


def test_a_file_of_another_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "g.json"
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a golden file"):
        read_golden(path)


# --- against the running service ----------------------------------------------------------------

@pytest.mark.vllm
@pytest.mark.timeout(1800)
def test_verify_golden_passes_then_fails_naming_the_altered_probe(vllm_stack, router_url, demo_source, tmp_path):
    from vllm_stack import write_config

    golden = tmp_path / "golden.json"
    made = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_golden.py"), "--out", str(golden),
                           "--reference-encoder", str(demo_source), "--max-length", str(vllm_stack.vllm.max_model_len)],
                          capture_output=True, text=True, timeout=1200, check=False)
    assert made.returncode == 0, made.stderr[-3000:]
    config = write_config(vllm_stack, tmp_path / "config.yaml")

    def verify(path: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "jv4_vllm.cli", "verify", "--config", str(config),
                               "--url", router_url, "--golden", str(path)], capture_output=True, text=True,
                              timeout=1200, check=False)

    passed = verify(golden)
    assert passed.returncode == 0, passed.stdout[-4000:] + passed.stderr[-2000:]
    assert "FAIL" not in passed.stdout and "image" not in passed.stderr
    for probe in ("over-length", "rgba-png", "exif-rotated-jpeg", "pil-rgba"):
        assert probe in passed.stdout

    body = json.loads(golden.read_text())
    entry = next(v for v in body["vectors"] if (v["task"], v["role"], v["probe"]) == ("code", "passage", "long"))
    single = read_golden(golden).vectors[body["vectors"].index(entry)].single.copy()
    single[: len(single) // 4] *= -1  # one vector altered
    entry["single"]["data"] = base64.b64encode(single.astype("<f4").tobytes()).decode()
    altered = tmp_path / "altered.json"
    altered.write_text(json.dumps(body))
    failed = verify(altered)
    assert failed.returncode == 1, failed.stdout[-4000:]
    failures = [line for line in failed.stdout.splitlines() if line.startswith("FAILED")]
    assert failures == [next(line for line in failures if "code passage long:" in line)]
    assert "short by" in failures[0]
