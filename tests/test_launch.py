"""The one set of process helpers (``jv4_vllm.deploy.launch``) on small real processes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from jv4_vllm.deploy.launch import free_port, spawn, stop_children, wait_until_up


def test_spawn_wait_and_stop_a_server(tmp_path: Path) -> None:
    port = free_port()
    server = spawn("web", [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], tmp_path)
    try:
        wait_until_up([f"http://127.0.0.1:{port}/"], [server], timeout_s=120)
        assert server.process.poll() is None
    finally:
        stop_children([server])
    assert server.process.returncode is not None and server.log_file.closed
    assert (tmp_path / "web.log").read_text().startswith(f"$ {sys.executable} -m http.server {port}")


def test_waiting_fails_at_once_when_the_process_dies_and_shows_its_log(tmp_path: Path) -> None:
    script = "import os; print('token', os.environ['JV4_LAUNCH_PROBE']); raise SystemExit(3)"
    dying = spawn("dying", [sys.executable, "-c", script], tmp_path, env={"JV4_LAUNCH_PROBE": "seen"})
    try:
        with pytest.raises(RuntimeError, match=r"dying exited with code 3[\s\S]*token seen"):
            wait_until_up([f"http://127.0.0.1:{free_port()}/"], [dying], timeout_s=600)
    finally:
        stop_children([dying])
