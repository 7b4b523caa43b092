"""Start things on this machine: one task's vLLM server, or the whole stack (``up``)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable

import httpx

from jv4_vllm.config import Config
from jv4_vllm.deploy.vllm_args import local_command
from jv4_vllm.core.spec import SPEC_FILE

__all__ = ["Child", "serve_adapter", "start_deployment", "stop_children", "up", "wait_ready"]

STOP_GRACE_S = 20.0


def _vllm_env(config: Config) -> dict[str, str]:
    return {**os.environ, **config.vllm.env}


def serve_adapter(config: Config, task: str, host: str = "0.0.0.0") -> int:
    """Replace this process with the task's vLLM server, after printing the exact command."""
    command = local_command(config, task, host=host)
    print(shlex.join(command), flush=True)
    os.execvpe(command[0], command, _vllm_env(config))
    return 0  # not reached


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]


def _spawn(name: str, command: list[str], env: dict[str, str], log_dir: Path) -> Child:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log_file = open(log_path, "ab")
    log_file.write(f"$ {shlex.join(command)}\n".encode())
    log_file.flush()
    # Own process group: stopping the stack reaches the server's helpers too.
    process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    return Child(name, process, log_path, log_file)


def start_deployment(config: Config, task: str, *, port: int | None = None, name: str | None = None) -> Child:
    """Start one task's vLLM server on loopback in the background."""
    command = local_command(config, task, host="127.0.0.1", port=port)
    return _spawn(name or f"vllm-{task}", command, _vllm_env(config), config.log_dir)


def stop_children(children: list[Child]) -> None:
    """SIGTERM every child's process group, then SIGKILL what is still alive after a grace period."""
    for child in children:
        if child.process.poll() is None:
            try:
                os.killpg(child.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + STOP_GRACE_S
    for child in children:
        try:
            child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:  # helpers may outlive the leader: clear the whole group
            os.killpg(child.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child.process.wait()
        child.log_file.close()


def _prepare_missing(config: Config) -> None:
    missing = [t for t in config.tasks if not (config.task_dir(t) / SPEC_FILE).is_file()]
    if missing:
        from jv4_vllm.checkpoint.prepare import prepare  # needs torch-free safetensors only, imported on demand
        print(f"preparing {missing} from {config.source} into {config.prepared_dir}", flush=True)
        prepare(config.source, config.prepared_dir, tasks=missing)


def _router_url(config: Config) -> str:
    host = "127.0.0.1" if config.router.host in ("0.0.0.0", "::") else config.router.host
    return f"http://{host}:{config.router.port}"


class _Stop(Exception):
    pass


def wait_ready(url: str, check_alive: Callable[[], None], timeout_s: float) -> None:
    """Poll ``url``/ready until it answers 200; ``check_alive`` raises if a process died meanwhile."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        check_alive()
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} was not ready after {timeout_s:.0f} s")


def _check_alive(children: list[Child]) -> None:
    for child in children:
        code = child.process.poll()
        if code is not None:
            raise RuntimeError(f"{child.name} exited with code {code}; its log: {child.log_path}")


def up(config: Config, config_path: Path) -> int:
    """Prepare, start the three deployments and the router, wait for /ready, supervise."""
    _prepare_missing(config)
    children: list[Child] = []

    def on_signal(signum: int, _frame: object) -> None:
        raise _Stop(signal.Signals(signum).name)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for task in config.tasks:
            children.append(start_deployment(config, task, port=config.deployments[task].port))
        router_cmd = [sys.executable, "-m", "jv4_vllm.cli", "router", "--config", str(config_path)]
        children.append(_spawn("router", router_cmd, dict(os.environ), config.log_dir))
        url = _router_url(config)
        print(f"starting {len(children) - 1} vLLM deployments and the router (logs in {config.log_dir}/)", flush=True)
        wait_ready(url, lambda: _check_alive(children), config.backend.startup_timeout_s)
        print(f"ready: {url}/v1/embeddings", flush=True)
        print(f"  curl -s {url}/v1/embeddings -H 'Content-Type: application/json' "
              f"-d '{{\"model\": \"{config.model_name}\", \"input\": [\"hello\"], \"task\": \"retrieval.query\"}}'",
              flush=True)
        while True:
            _check_alive(children)
            time.sleep(1.0)
    except _Stop as stop:
        print(f"{stop}: stopping the stack", flush=True)
        return 0
    except (RuntimeError, TimeoutError) as failure:
        print(f"error: {failure}; stopping the stack", file=sys.stderr, flush=True)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop_children(children)
