"""Real vLLM CPU deployments of the demo checkpoint for tests (started once per session).

Processes are started, awaited and stopped with the package's own helpers
(:mod:`jv4_vllm.deploy.launch`); the names here only fix the tests' defaults.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from jv4_vllm.config import Config
from jv4_vllm.deploy.launch import Child, free_port, start_deployment, stop_children, wait_until_up

__all__ = ["InProcessServer", "demo_config", "free_port", "serve_shared", "shared_config", "shared_paths",
           "start_all", "wait_healthy", "wait_ready", "write_config"]

TASKS = ("retrieval", "text-matching", "code")
MAX_MODEL_LEN = 4096  # texts of several thousand tokens, late-chunking windows
STARTUP_TIMEOUT_S = 420.0


def demo_config(source: Path, prepared: Path, log_dir: Path, **backend: object) -> Config:
    """A config whose deployments listen on fresh loopback ports."""
    ports = {task: free_port() for task in TASKS}
    return Config.model_validate({
        "model_name": "jina-embeddings-v4",
        "source": str(source),
        "prepared_dir": str(prepared),
        "log_dir": str(log_dir),
        "router": {"host": "127.0.0.1", "port": free_port()},
        "deployments": {t: {"urls": [f"http://127.0.0.1:{p}"], "port": p} for t, p in ports.items()},
        "vllm": {
            "dtype": "float32",
            "max_model_len": MAX_MODEL_LEN,
            "extra_args": ["--enforce-eager"],
            "env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"},
        },
        "backend": {"health_interval_s": 0.5, **backend},
    })


def wait_healthy(urls: list[str], children: list[Child], timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Block until every URL answers /health, failing fast if a server process dies."""
    wait_until_up([f"{url}/health" for url in urls], children, timeout_s)


def start_all(config: Config) -> list[Child]:
    children = [start_deployment(config, task, port=config.deployments[task].port) for task in TASKS]
    try:
        wait_healthy([config.deployments[t].urls[0] for t in TASKS], children)
    except BaseException:
        stop_children(children)
        raise
    return children


class InProcessServer:
    """A real uvicorn server for an ASGI app on a loopback port, inside the test's event loop."""

    def __init__(self, app, port: int) -> None:  # noqa: ANN001 - any ASGI app
        import uvicorn

        self.url = f"http://127.0.0.1:{port}"
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                     lifespan="on"))
        self._task = None

    async def __aenter__(self) -> "InProcessServer":
        import asyncio

        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.05)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.should_exit = True
        await self._task


def write_config(config: Config, path: Path) -> Path:
    """The config as a YAML file, for commands that take --config."""
    import yaml

    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return path


def wait_ready(url: str, process: subprocess.Popen[bytes] | None = None, timeout_s: float = 120.0) -> None:
    """Until ``url``/ready answers 200; fails at once if ``process`` exits."""
    wait_until_up([f"{url}/ready?all=true"], [process] if process is not None else [], timeout_s)


# ---- a shared demo stack for development (JV4_TEST_STACK_DIR) ------------------------------------

def shared_paths(directory: Path) -> tuple[Path, Path]:
    """The shared stack's demo source and prepared dirs (built by ``serve_shared``)."""
    return directory / "demo-source", directory / "prepared"


def shared_config(directory: Path) -> Config:
    """The running shared stack's config, with a fresh router port for this test session."""
    import yaml

    data = yaml.safe_load((directory / "stack.yaml").read_text())
    config = Config.model_validate(data)
    wait_healthy([config.deployments[t].urls[0] for t in TASKS], [], timeout_s=30)
    return config.model_copy(update={"router": config.router.model_copy(update={"port": free_port()})})


def serve_shared(directory: Path) -> None:
    """Build the demo checkpoint, start the three deployments and keep them up until killed."""
    import signal

    from jv4_vllm.checkpoint.demo import build_demo_checkpoint
    from jv4_vllm.checkpoint.prepare import prepare

    source, prepared = shared_paths(directory)
    if not (source / "config.json").is_file():
        build_demo_checkpoint(source, seed=0)
    if not all((prepared / t / "jv4.json").is_file() for t in TASKS):
        prepare(source, prepared)
    config = demo_config(source, prepared, directory / "logs")
    children = start_all(config)
    write_config(config, directory / "stack.yaml")
    print(f"shared stack ready: {directory / 'stack.yaml'}", flush=True)
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        (directory / "stack.yaml").unlink(missing_ok=True)
        stop_children(children)


if __name__ == "__main__":
    import sys

    serve_shared(Path(sys.argv[1]).resolve())
