"""``jv4-vllm run-batch`` against the real router on the demo stack: every line answered once,
vectors equal to direct calls, success lines in vLLM's own batch output format, a SIGKILL
halfway repaired by the rerun, a 429/503 storm ridden out, shards that cover the input once."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from aiohttp import ClientSession, web
from fault_upstream import FaultUpstream
from images_util import make_image

from jv4_vllm.bulk.job import JobSettings
from jv4_vllm.bulk.pacing import PacingSettings
from jv4_vllm.bulk.run_batch import run_batch
from jv4_vllm.bulk.shard import parse_shard
from jv4_vllm.bulk.transport import Transport

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

TASKS = ["retrieval.passage", "retrieval.query", "text-matching", "code.query", "code.passage"]
MIN_COS = 0.99999


def _png(seed: int) -> str:
    buffer = io.BytesIO()
    make_image(56 + 8 * seed, 48, seed=seed).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def batch_lines(texts: int = 60) -> list[str]:
    """Texts of several tasks, images, rerank lines, a refused request and two unreadable lines."""
    lines = [{"custom_id": f"text-{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "jina-embeddings-v4", "input": [f"passage {i} on vectors", f"second {i}"],
                       "task": TASKS[i % len(TASKS)]}} for i in range(texts)]
    lines += [{"custom_id": f"image-{i}", "method": "POST", "url": "/v1/embeddings",
               "body": {"input": [{"image": _png(i)}, {"text": "a caption"}], "task": "retrieval.query"}}
              for i in range(3)]
    lines += [{"custom_id": f"rerank-{i}", "method": "POST", "url": "/v1/rerank",
               "body": {"query": f"query {i}", "documents": ["about vectors", "about cooking", {"image": _png(7)}]}}
              for i in range(2)]
    lines.append({"custom_id": "refused", "method": "POST", "url": "/v1/embeddings",
                  "body": {"input": ["fine"], "task": "no-such-task"}})
    out = [json.dumps(line) for line in lines]
    out.insert(5, "{this is not json")
    out.insert(9, json.dumps({"method": "POST", "url": "/v1/embeddings", "body": {"input": ["x"]}}))
    return out


def write_input(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def read_output(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "jv4_vllm.cli", *args]


def _vectors(body: dict) -> list[np.ndarray]:
    return [np.asarray(item["embedding"], dtype=np.float64) for item in body["data"]]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_every_line_answered_once_and_equal_to_direct_calls(router_url, tmp_path):
    from vllm.entrypoints.launchers.run_batch import BatchRequestOutput

    lines = batch_lines(texts=12)
    source = write_input(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    done = subprocess.run(cli("run-batch", "-i", str(source), "-o", str(out), "--url", router_url, "--quiet"),
                          capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "invalid line: 2" in done.stderr and "400: 1" in done.stderr
    rows = read_output(out)
    assert len(rows) == len(lines)  # one output line per input line
    by_id = {row["custom_id"]: row for row in rows if row["custom_id"] is not None}
    sent = {json.loads(line)["custom_id"]: json.loads(line) for line in lines
            if line.startswith("{\"custom_id\"")}
    assert set(by_id) == set(sent)
    unreadable = sorted(row["error"]["line"] for row in rows if row["custom_id"] is None)
    assert unreadable == [6, 10]  # numbered from 1, as an editor shows them
    assert by_id["refused"]["response"]["status_code"] == 400
    assert "task" in by_id["refused"]["response"]["body"]["error"]["message"]
    with httpx.Client(base_url=router_url, timeout=120) as http:
        for custom_id, line in sent.items():
            row = by_id[custom_id]
            if custom_id == "refused":
                continue
            assert row["response"]["status_code"] == 200, row
            BatchRequestOutput.model_validate(row)  # vLLM's own batch output model
            direct = http.post(line["url"], json=line["body"]).json()
            if line["url"] == "/v1/rerank":
                got = [(r["index"], r["relevance_score"]) for r in row["response"]["body"]["results"]]
                want = [(r["index"], r["relevance_score"]) for r in direct["results"]]
                assert [i for i, _ in got] == [i for i, _ in want]
                np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=1e-5)
                continue
            for a, b in zip(_vectors(row["response"]["body"]), _vectors(direct), strict=True):
                assert _cos(a, b) >= MIN_COS


def test_duplicate_custom_ids_are_refused_before_sending(router_url, tmp_path):
    lines = batch_lines(texts=3) + [batch_lines(texts=1)[0]]  # text-0 twice
    source = write_input(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    done = subprocess.run(cli("run-batch", "-i", str(source), "-o", str(out), "--url", router_url, "--quiet"),
                          capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 2
    assert "'text-0' on lines 1, 12" in done.stderr and "nothing was sent" in done.stderr
    assert not out.exists() or out.read_text() == ""


def test_sigkill_halfway_then_rerun_leaves_one_line_per_id(router_url, tmp_path):
    lines = batch_lines(texts=150)
    source = write_input(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    args = cli("run-batch", "-i", str(source), "-o", str(out), "--url", router_url, "--quiet",
               "--max-concurrency", "2", "--initial-concurrency", "1")
    child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300  # a shared, busy machine can be slow
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 20):
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    partial = out.read_bytes().count(b"\n")
    assert 20 <= partial < len(lines), "the job must be killed partway"
    with open(out, "ab") as fh:  # what a kill in the middle of a write leaves
        fh.write(b'{"id":"batch_req_cut","custom_id":"text-149","response":{"status_co')
    done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = read_output(out)  # the whole file parses
    keys = [row["custom_id"] or f"line {row['error']['line']}" for row in rows]
    assert len(keys) == len(set(keys)) == len(lines)
    assert f"{partial} already done" in done.stderr


class Storm(FaultUpstream):
    """In front of the router: 429s and 503s with Retry-After, dropped connections, then answers."""

    def __init__(self, router_url: str) -> None:
        super().__init__()
        self.router_url = router_url
        self.seen: dict[str, int] = {}
        self.storm_until = time.monotonic() + 1.5

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/embeddings", self.embeddings)]

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        body = await request.read()
        if time.monotonic() < self.storm_until or self.calls % 3 == 0:
            kind = ("429", "503", "drop")[self.calls % 3]
            self.seen[kind] = self.seen.get(kind, 0) + 1
            if kind == "drop":
                request.transport.close()  # no HTTP answer at all
                return web.Response()
            status = int(kind)
            return web.json_response({"error": {"message": "busy", "type": "rate_limit_error"}}, status=status,
                                     headers={"Retry-After": "0.2"})
        async with ClientSession() as http, http.post(
                self.router_url + "/v1/embeddings", data=body, headers={"content-type": "application/json"}) as answer:
            return web.Response(body=await answer.read(), status=answer.status, content_type="application/json")


async def test_a_429_503_storm_slows_the_job_but_fails_no_line(router_url, tmp_path):
    lines = [line for line in batch_lines(texts=30) if line.startswith('{"custom_id"')
             and '"url": "/v1/embeddings"' in line and "refused" not in line]
    source = write_input(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    async with Storm(router_url) as storm:
        transport = Transport.router(storm.url)
        settings = JobSettings(pacing=PacingSettings(initial=8, maximum=16, backoff_s=0.05), quiet=True)
        try:
            summary = await asyncio.wait_for(run_batch(str(source), str(out), transport, settings), 500)
        finally:
            await transport.aclose()
    rows = read_output(out)
    assert sorted(row["custom_id"] for row in rows) == sorted(json.loads(line)["custom_id"] for line in lines)
    assert {row["response"]["status_code"] for row in rows} == {200}
    assert storm.seen.get("429") and storm.seen.get("503") and storm.seen.get("drop")
    assert "overload answers" in summary


def test_two_shards_cover_the_input_exactly_once(router_url, tmp_path):
    lines = batch_lines(texts=16)
    source = write_input(tmp_path / "in.jsonl", lines)
    seen: list[str] = []
    for index in range(2):
        out = tmp_path / f"out-{index}.jsonl"
        done = subprocess.run(cli("run-batch", "-i", str(source), "-o", str(out), "--url", router_url, "--quiet",
                                  "--shard", f"{index}/2"), capture_output=True, text=True, check=False, timeout=300)
        assert done.returncode == 0, done.stderr
        part = [row["custom_id"] or f"line {row['error']['line']}" for row in read_output(out)]
        assert 0 < len(part) < len(lines)
        seen += part
    assert len(seen) == len(set(seen)) == len(lines)


def test_shards_split_stably():
    keys = [f"doc-{i}" for i in range(2000)]
    from jv4_vllm.bulk.keys import key_hash

    parts = [[k for k in keys if parse_shard(f"{i}/3").owns(key_hash(k))] for i in range(3)]
    assert sorted(k for part in parts for k in part) == sorted(keys)
    assert all(600 < len(p) < 740 for p in parts)
    assert key_hash("doc-1") == 0x41f5345f287af456  # the same on every machine, so workers agree
    with pytest.raises(ValueError):
        parse_shard("2/2")
    os.environ["JOB_COMPLETION_INDEX"] = "1"
    try:
        assert parse_shard("job/4").index == 1
    finally:
        del os.environ["JOB_COMPLETION_INDEX"]


def test_config_runs_in_process_like_the_router(vllm_stack, router_url, tmp_path):
    from vllm_stack import write_config

    config = write_config(vllm_stack, tmp_path / "config.yaml")
    lines = batch_lines(texts=5)
    source = write_input(tmp_path / "in.jsonl", lines)
    outputs = {}
    for name, target in (("router", ["--url", router_url]), ("engine", ["--config", str(config)])):
        out = tmp_path / f"{name}.jsonl"
        done = subprocess.run(cli("run-batch", "-i", str(source), "-o", str(out), "--quiet", *target),
                              capture_output=True, text=True, check=False, timeout=300)
        assert done.returncode == 0, done.stderr
        outputs[name] = {row["custom_id"] or row["error"]["line"]: row for row in read_output(out)}
    assert outputs["router"].keys() == outputs["engine"].keys()
    for key, row in outputs["router"].items():
        other = outputs["engine"][key]
        assert (row["response"] or {}).get("status_code") == (other["response"] or {}).get("status_code")
        body = (row["response"] or {}).get("body") or {}
        if "data" in body:
            for a, b in zip(_vectors(body), _vectors(other["response"]["body"]), strict=True):
                assert _cos(a, b) >= MIN_COS
