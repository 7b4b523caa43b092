"""The processes a run starts (one vLLM deployment, router processes, the replay upstream) and stops.

Started, waited on and stopped with the helpers of :mod:`jv4_vllm.deploy.launch`: every
child runs in its own process group and is stopped by its PID, whatever happens to the run.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Collection
from pathlib import Path

import yaml

from jv4_vllm.bench.settings import BenchSettings
from jv4_vllm.config import Config
from jv4_vllm.deploy.launch import Child, free_port, spawn, start_deployment, stop_children, wait_until_up

__all__ = ["Stack", "bench_config"]

STARTUP_TIMEOUT_S = 600.0
INTERRUPT_GRACE_S = 30.0
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}


def bench_config(settings: BenchSettings, upstream_url: str | None = None) -> Config:
    """A one-deployment config on loopback; the engine may keep as many calls in flight as the load offers."""
    port = free_port()
    url = upstream_url or settings.vllm_url or f"http://127.0.0.1:{port}"
    return Config.model_validate({
        "source": str(settings.source),
        "prepared_dir": str(settings.prepared),
        "log_dir": str(settings.out / "logs"),
        "router": {"host": "127.0.0.1", "port": free_port(), "log_level": "warning"},
        "deployments": {settings.task: {"urls": [url], "port": port}},
        "vllm": {
            "dtype": settings.dtype,
            "max_model_len": settings.max_model_len,
            "extra_args": ["--enforce-eager", *settings.extra_vllm_args],
            "env": VLLM_ENV,
        },
        # admission wide open: the benchmark offers the load it measures
        "backend": {"tokens_in_flight_per_replica": 1 << 30},
    })


class Stack:
    """Children of one run; :meth:`close` stops all of them."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []

    def close(self) -> None:
        stop_children(self.children)
        self.children = []

    def stop(self, child: Child, interrupt: bool = False) -> None:
        """Stop one child; ``interrupt`` sends SIGINT first (a profiler writes its report on it)."""
        if interrupt and child.process.poll() is None:
            child.process.send_signal(signal.SIGINT)
            try:
                child.process.wait(timeout=INTERRUPT_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        stop_children([child])
        self.children.remove(child)

    def start_vllm(self, config: Config, task: str) -> tuple[Child, str]:
        child = start_deployment(config, task, name=f"bench-vllm-{task}")
        self.children.append(child)
        url = config.deployments[task].urls[0]
        wait_until_up([f"{url}/health"], [child], STARTUP_TIMEOUT_S)
        return child, url

    def start_router(self, config: Config, name: str, profile_to: Path | None = None,
                     unset_env: Collection[str] = ()) -> tuple[Child, str]:
        """A real router process (``jv4-vllm router``), optionally under pyinstrument or without some
        of this environment's variables."""
        self.log_dir.mkdir(parents=True, exist_ok=True)  # nothing may have been started yet (--vllm-url)
        config_path = self.log_dir / f"{name}.yaml"
        config_path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
        # --log-level too: the CLI configures logging before the router reads its own log_level.
        command = [sys.executable, "-m", "jv4_vllm.cli", "--log-level", config.router.log_level.upper(),
                   "router", "--config", str(config_path)]
        if profile_to is not None:
            command = [sys.executable, "-m", "pyinstrument", "--renderer", "text", "--outfile", str(profile_to),
                       *command[1:]]
        child = self._spawn(name, command, unset=unset_env)
        url = f"http://{config.router.host}:{config.router.port}"
        wait_until_up([f"{url}/ready"], [child], STARTUP_TIMEOUT_S)
        return child, url

    def start_replay(self, body_file: Path, metadata_file: Path, name: str) -> tuple[Child, str]:
        port = free_port()
        command = [sys.executable, "-m", "jv4_vllm.bench.replay", "--body", str(body_file),
                   "--metadata", str(metadata_file), "--port", str(port)]
        child = self._spawn(f"bench-{name}", command)
        url = f"http://127.0.0.1:{port}"
        wait_until_up([f"{url}/health"], [child], STARTUP_TIMEOUT_S)
        return child, url

    def _spawn(self, name: str, command: list[str], unset: Collection[str] = ()) -> Child:
        child = spawn(name, command, self.log_dir, unset=unset)
        self.children.append(child)
        return child
