"""Start things on this machine: one task's vLLM server, or the whole stack (``up``).

The process helpers here (:func:`spawn`, :func:`start_deployment`, :func:`wait_until_up`,
:func:`stop_children`, :func:`free_port`) are the only ones: the benchmark and the tests
start and stop their processes with them too.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from jv4_vllm.config import Config
from jv4_vllm.core.spec import SPEC_FILE
from jv4_vllm.deploy.vllm_args import local_command

__all__ = ["Child", "free_port", "serve_adapter", "spawn", "start_deployment", "stop_children", "up", "wait_until_up"]

STOP_GRACE_S = 20.0
LOG_TAIL_CHARS = 3000


def serve_adapter(config: Config, task: str, host: str = "0.0.0.0") -> int:
    """Replace this process with the task's vLLM server, after printing the exact command."""
    command = local_command(config, task, host=host)
    print(shlex.join(command), flush=True)
    os.execvpe(command[0], command, {**os.environ, **config.vllm.env})
    return 0  # not reached


@dataclass
class Child:
    """A process this package started: its own process group, its output in ``log_path``."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    def check(self) -> None:
        """Raise RuntimeError, with the end of the log, if the process has exited."""
        code = self.process.poll()
        if code is not None:
            tail = self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
            raise RuntimeError(f"{self.name} exited with code {code}; its log ({self.log_path}) ends:\n{tail}")


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(name: str, command: list[str], log_dir: Path, env: Mapping[str, str] | None = None,
          unset: Collection[str] = ()) -> Child:
    """Start ``command`` in the background, ``env`` over this environment less ``unset``, output to
    ``log_dir/name.log``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log_file = open(log_path, "ab")
    log_file.write(f"$ {shlex.join(command)}\n".encode())
    log_file.flush()
    # Own process group: stopping it reaches the server's helpers too.
    environment = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in unset}
    process = subprocess.Popen(command, env=environment, stdout=log_file,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    return Child(name, process, log_path, log_file)


def start_deployment(config: Config, task: str, *, port: int | None = None, name: str | None = None) -> Child:
    """Start one task's vLLM server on loopback in the background."""
    command = local_command(config, task, host="127.0.0.1", port=port)
    return spawn(name or f"vllm-{task}", command, config.log_dir, config.vllm.env)


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


def wait_until_up(urls: Sequence[str], children: Sequence[Child | subprocess.Popen[bytes]] = (),
                  timeout_s: float = 600.0) -> None:
    """Poll every URL until it answers 200; fail at once if one of ``children`` exits meanwhile."""
    deadline = time.monotonic() + timeout_s
    pending = list(urls)
    while True:
        for child in children:
            if isinstance(child, Child):
                child.check()
            elif child.poll() is not None:
                raise RuntimeError(f"process {child.pid} exited with code {child.returncode}")
        pending = [url for url in pending if not _answers_200(url)]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"not up after {timeout_s:.0f} s: {', '.join(pending)}")
        time.sleep(0.5)


def _answers_200(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


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
        children.append(spawn("router", router_cmd, config.log_dir))
        url = _router_url(config)
        print(f"starting {len(children) - 1} vLLM deployments and the router (logs in {config.log_dir}/)", flush=True)
        # /ready is 200 once ANY task can serve; up waits until every task can.
        wait_until_up([f"{url}/ready?all=true"], children, config.backend.startup_timeout_s)
        print(f"ready: {url}/v1/embeddings", flush=True)
        print(f"  curl -s {url}/v1/embeddings -H 'Content-Type: application/json' "
              f"-d '{{\"model\": \"{config.model_name}\", \"input\": [\"hello\"], \"task\": \"retrieval.query\"}}'",
              flush=True)
        while True:
            for child in children:
                child.check()
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
