"""`jv4-vllm up` and `scripts/demo.sh` as users run them: start, answer, stop, leave nothing behind."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from vllm_stack import free_port, wait_ready, write_config

pytestmark = [pytest.mark.vllm, pytest.mark.own_stack, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]


def processes_mentioning(needle: str) -> list[int]:
    """PIDs whose command line contains ``needle`` (the unique ports of this test's stack)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline:
            found.append(int(proc.name))
    return found


def start_one_task_up(stack_config, tmp_path: Path, *, quiet: bool = False):  # noqa: ANN001
    """`jv4-vllm up` on a one-task config with fresh ports, not waited for; returns
    (process, config, vLLM port, config path). ``quiet`` drops its output."""
    port = free_port()
    one_task = stack_config.model_copy(update={
        "deployments": {"retrieval": stack_config.deployments["retrieval"].model_copy(
            update={"urls": [f"http://127.0.0.1:{port}"], "port": port})},
        "router": stack_config.router.model_copy(update={"port": free_port()}),
        "log_dir": tmp_path / "logs",
    })
    path = write_config(one_task, tmp_path / "up.yaml")
    output = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL} if quiet else \
        {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    up = subprocess.Popen([sys.executable, "-m", "jv4_vllm.cli", "up", "--config", str(path)], **output)
    return up, one_task, port, path


def _one_task_stack(stack_config, tmp_path: Path):  # noqa: ANN001
    """`jv4-vllm up` on a one-task config with fresh ports, until ready; returns (process, router url, vLLM port,
    config path)."""
    up, one_task, port, path = start_one_task_up(stack_config, tmp_path)
    url = f"http://127.0.0.1:{one_task.router.port}"
    wait_ready(url, up, timeout_s=420)
    seen = [up.stdout.readline() for _ in range(3)]  # up announces readiness itself
    assert any(line.startswith("ready:") for line in seen), seen
    return up, url, port, path


def test_up_starts_and_stops_everything(stack_config, tmp_path):
    up, url, port, path = _one_task_stack(stack_config, tmp_path)
    try:
        response = httpx.post(f"{url}/v1/embeddings", json={"input": "hello", "task": "retrieval.query"}, timeout=60)
        assert response.status_code == 200
        assert processes_mentioning(f"--port {port}"), "the vLLM child should be running"
    finally:
        up.send_signal(signal.SIGTERM)
        output, _ = up.communicate(timeout=60)
    assert up.returncode == 0, output
    assert "stopping the stack" in output
    assert processes_mentioning(f"--port {port}") == []
    assert processes_mentioning(str(path)) == []


def test_up_stops_the_stack_when_a_child_dies(stack_config, tmp_path):
    up, url, port, path = _one_task_stack(stack_config, tmp_path)
    try:
        for pid in processes_mentioning(f"--port {port}"):
            os.kill(pid, signal.SIGKILL)
        output, _ = up.communicate(timeout=90)
    finally:
        if up.poll() is None:
            up.kill()
    assert up.returncode == 1, output
    assert "vllm-retrieval exited" in output and "stopping the stack" in output
    assert processes_mentioning(f"--port {port}") == []
    assert processes_mentioning(str(path)) == []


def test_demo_script_exits_zero():
    result = subprocess.run(["scripts/demo.sh"], cwd=ROOT, capture_output=True, text=True, timeout=840)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "text  ->" in result.stdout and "image ->" in result.stdout


def test_serve_adapter_prints_its_command_and_serves(stack_config, tmp_path):
    from jv4_vllm.deploy.vllm_args import local_command
    from vllm_stack import wait_healthy

    port = free_port()
    config = stack_config.model_copy(update={"deployments": {
        "code": stack_config.deployments["code"].model_copy(update={"urls": [f"http://127.0.0.1:{port}"], "port": port})}})
    path = write_config(config, tmp_path / "serve.yaml")
    server = subprocess.Popen([sys.executable, "-m", "jv4_vllm.cli", "serve-adapter", "--config", str(path),
                               "--task", "code"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              start_new_session=True)
    try:
        printed = shlex.split(server.stdout.readline())
        assert printed == local_command(config, "code", host="0.0.0.0")
        assert "pooling" in printed and str(port) in printed
        wait_healthy([f"http://127.0.0.1:{port}"], [])
        body = {"model": "jina-embeddings-v4-code", "input": "Query: hi", "use_activation": False}
        assert httpx.post(f"http://127.0.0.1:{port}/pooling", json=body, timeout=60).status_code == 200
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
