"""`jv4-vllm up` signalled twice at the worst moments leaves no process of its stack behind.

Each case starts `up` on a one-task config (one real vLLM server at a time) and sends two
signals: during start-up, back to back once ready, and while it is stopping. Whatever the
moment, every child must be gone when `up` has exited: nothing orphaned holds a port or a GPU.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_stack_commands import _one_task_stack, processes_mentioning, start_one_task_up

pytestmark = [pytest.mark.vllm, pytest.mark.own_stack, pytest.mark.timeout(900)]


def _survivors(port: int, path: Path) -> list[int]:
    return processes_mentioning(f"--port {port}") + processes_mentioning(str(path))


def _assert_no_survivors(port: int, path: Path, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while _survivors(port, path) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _survivors(port, path) == []


def _exits(up: subprocess.Popen[str], timeout_s: float = 90) -> str:
    output, _ = up.communicate(timeout=timeout_s)
    return output


def _until(condition, timeout_s: float = 120) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_two_interrupts_during_start_up(stack_config, tmp_path):
    up, _, port, path = start_one_task_up(stack_config, tmp_path)
    try:
        _until(lambda: processes_mentioning(f"--port {port}") and len(processes_mentioning(str(path))) >= 2)
        time.sleep(1.0)  # vLLM is importing and loading; the router is starting
        up.send_signal(signal.SIGINT)
        time.sleep(0.2)
        up.send_signal(signal.SIGINT)
        output = _exits(up)
    finally:
        if up.poll() is None:
            up.kill()
    assert "stopping the stack" in output, output
    _assert_no_survivors(port, path, 10)


def test_two_terminations_back_to_back_once_ready(stack_config, tmp_path):
    up, _, port, path = _one_task_stack(stack_config, tmp_path)
    try:
        up.send_signal(signal.SIGTERM)
        up.send_signal(signal.SIGTERM)
        output = _exits(up)
    finally:
        if up.poll() is None:
            up.kill()
    assert up.returncode == 0 and "stopping the stack" in output, output
    _assert_no_survivors(port, path, 10)


def test_a_second_termination_while_stopping(stack_config, tmp_path):
    up, _, port, path = _one_task_stack(stack_config, tmp_path)
    try:
        up.send_signal(signal.SIGTERM)
        _until(lambda: "stopping the stack" in up.stdout.readline(), timeout_s=30)
        time.sleep(0.3)  # up is now inside stop_children, waiting for its children to exit
        up.send_signal(signal.SIGTERM)
        _exits(up)
    finally:
        if up.poll() is None:
            up.kill()
    assert up.returncode == 0
    _assert_no_survivors(port, path, 10)


def test_children_die_with_a_killed_up(stack_config, tmp_path):
    """SIGKILL cannot be handled: PR_SET_PDEATHSIG takes the children down with `up`."""
    up, _, port, path = start_one_task_up(stack_config, tmp_path, quiet=True)
    _until(lambda: processes_mentioning(f"--port {port}") and len(processes_mentioning(str(path))) >= 2)
    up.kill()
    up.wait(timeout=30)
    _assert_no_survivors(port, path, 20)
