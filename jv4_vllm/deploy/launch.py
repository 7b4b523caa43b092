"""Start things on this machine: one task's vLLM server, or the whole stack (``up``).

The process helpers here (:func:`spawn`, :func:`start_deployment`, :func:`wait_until_up`,
:func:`stop_children`, :func:`free_port`) are the only ones: the benchmark and the tests
start and stop their processes with them too.

``up`` supervises without windows: its signal handler only counts signals (it never raises into
whatever the code was doing), every child is recorded as soon as ``Popen`` returns, and the
handlers stay installed until every child has been reaped. A second signal escalates to SIGKILL
of every child's process group; it never abandons them. On Linux each child also gets
``PR_SET_PDEATHSIG``: if ``up`` itself is killed, its children die with it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
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
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def serve_adapter(config: Config, task: str, host: str = "0.0.0.0") -> int:
    """Replace this process with the task's vLLM server, after printing the exact command."""
    command = local_command(config, task, host=host)
    print(shlex.join(command), flush=True)
    os.execvpe(command[0], command, {**os.environ, **config.server_env(task)})
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


def _die_with(parent: int) -> Callable[[], None]:
    """A preexec hook: the child gets SIGKILL when ``parent`` dies (Linux), even if it died already."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name, use_errno=True) if name and sys.platform.startswith("linux") else None

    def arm() -> None:
        if libc is None:
            return
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(1)

    return arm


def spawn(name: str, command: list[str], log_dir: Path, env: Mapping[str, str] | None = None,
          unset: Collection[str] = (), die_with_parent: bool = False) -> Child:
    """Start ``command`` in the background, ``env`` over this environment less ``unset``, output to
    ``log_dir/name.log``. ``die_with_parent``: the child is killed when this process dies (Linux;
    only from the thread that lives as long as the process, as PDEATHSIG follows the forking thread)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log_file = open(log_path, "ab")
    log_file.write(f"$ {shlex.join(command)}\n".encode())
    log_file.flush()
    # Own process group: stopping it reaches the server's helpers too.
    environment = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in unset}
    process = subprocess.Popen(command, env=environment, stdout=log_file,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                               preexec_fn=_die_with(os.getpid()) if die_with_parent else None)
    return Child(name, process, log_path, log_file)


def start_deployment(config: Config, task: str, *, port: int | None = None, name: str | None = None,
                     die_with_parent: bool = False) -> Child:
    """Start one task's vLLM server on loopback in the background."""
    command = local_command(config, task, host="127.0.0.1", port=port)
    return spawn(name or f"vllm-{task}", command, config.log_dir, config.server_env(task), die_with_parent=die_with_parent)


def kill_children(children: Sequence[Child], sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to every child's whole process group (safe to call from a signal handler)."""
    for child in list(children):
        try:
            os.killpg(child.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_children(children: list[Child]) -> None:
    """SIGTERM every child's process group, then SIGKILL what is still alive after a grace period."""
    kill_children([child for child in children if child.process.poll() is None], signal.SIGTERM)
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


class _Supervisor:
    """``up``'s signal handling: the handler only counts; a second signal kills every child at once."""

    def __init__(self) -> None:
        self.children: list[Child] = []
        self.signals: list[int] = []

    def handle(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)
        if len(self.signals) > 1:
            kill_children(self.children)

    @property
    def stopping(self) -> bool:
        return bool(self.signals)

    def start(self, child: Callable[[], Child]) -> None:
        """Start and record a child, unless a signal came first (a later one finds it recorded)."""
        if not self.stopping:
            self.children.append(child())


def up(config: Config, config_path: Path) -> int:
    """Prepare, start the three deployments and the router, wait for /ready, supervise."""
    _prepare_missing(config)
    supervisor = _Supervisor()
    children = supervisor.children
    previous = {s: signal.signal(s, supervisor.handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _supervise(config, config_path, supervisor)
    except (RuntimeError, TimeoutError) as failure:
        print(f"error: {failure}; stopping the stack", file=sys.stderr, flush=True)
        return 1
    finally:
        if len(supervisor.signals) > 1:
            kill_children(children)
        stop_children(children)  # the handlers stay: a signal now escalates to SIGKILL
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _supervise(config: Config, config_path: Path, supervisor: _Supervisor) -> int:
    """Start the stack and watch it until a signal (0) or a child's death (RuntimeError)."""
    children = supervisor.children
    for task in config.tasks:
        supervisor.start(lambda: start_deployment(config, task, port=config.deployments[task].port,
                                                  die_with_parent=True))
    router_cmd = [sys.executable, "-m", "jv4_vllm.cli", "router", "--config", str(config_path)]
    supervisor.start(lambda: spawn("router", router_cmd, config.log_dir, die_with_parent=True))
    url = _router_url(config)
    if not supervisor.stopping:
        print(f"starting {len(children) - 1} vLLM deployments and the router (logs in {config.log_dir}/)", flush=True)
    # /ready is 200 once ANY task can serve; up waits until every task can.
    deadline = time.monotonic() + config.backend.startup_timeout_s
    while not supervisor.stopping and not _answers_200(f"{url}/ready?all=true"):
        for child in children:
            child.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"not up after {config.backend.startup_timeout_s:.0f} s: {url}/ready?all=true")
        time.sleep(0.5)
    if not supervisor.stopping:
        print(f"ready: {url}/v1/embeddings", flush=True)
        print(f"  curl -s {url}/v1/embeddings -H 'Content-Type: application/json' "
              f"-d '{{\"model\": \"{config.model_name}\", \"input\": [\"hello\"], \"task\": \"retrieval.query\"}}'",
              flush=True)
    while not supervisor.stopping:
        for child in children:
            child.check()
        time.sleep(0.5)
    print(f"{signal.Signals(supervisor.signals[0]).name}: stopping the stack", flush=True)
    return 0
