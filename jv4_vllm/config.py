"""Service configuration: one YAML file, every key overridable from the environment.

Environment twins: ``JV4__SECTION__KEY=value`` overrides ``section.key`` (values are
parsed as YAML, so ``JV4__ROUTER__PORT=9000`` is an int). Config is read when a command
starts, never at import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "BackendSettings",
    "Config",
    "DeploymentConfig",
    "EmbedDefaults",
    "LimitsConfig",
    "RouterConfig",
    "VllmConfig",
    "load_config",
]

ENV_PREFIX = "JV4__"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeploymentConfig(_Strict):
    """Where one task's vLLM replicas live. ``dns+http://name:port`` resolves to every address."""

    urls: list[str] = Field(min_length=1, description="Replica base URLs, or dns+http://host:port")
    port: int | None = Field(None, description="Port used when this machine starts the deployment")


class VllmConfig(_Strict):
    """How vLLM servers are started (shared by serve-adapter, up and the manifests)."""

    dtype: str = "bfloat16"
    max_model_len: int = 32768
    extra_args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict, description="Environment for locally started servers")
    image: str = Field("vllm/vllm-openai:v0.32.0", description="Container image used by the manifests")


class BackendSettings(_Strict):
    """How the engine talks to vLLM."""

    wire_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    max_batch_tokens: int = Field(8192, gt=0, description="Token budget of one /pooling call")
    max_batch_items: int = Field(64, gt=0, description="Texts in one /pooling call at most")
    tokens_in_flight_per_replica: int = Field(
        65536, gt=0, description="Prompt tokens in flight per healthy replica (admission budget of a task)")
    max_queue: int = Field(1024, ge=0, description="Requests waiting for admission before 429")
    late_chunking_overlap: int = Field(256, ge=0, description="Tokens of context shared by long late-chunking windows")
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 300.0
    health_interval_s: float = 2.0
    dns_refresh_s: float = 10.0
    dns_server: str | None = Field(None, description="DNS server host:port for dns+ URLs (default: system resolver)")
    startup_timeout_s: float = 600.0


class LimitsConfig(_Strict):
    """Admission limits of the router (and the direct client's checks)."""

    max_inputs_per_request: int = Field(2048, gt=0)
    max_request_tokens: int = Field(
        1 << 20, gt=0, description="Prompt tokens of one request at most (413 past it); images count their tokens")
    max_request_bytes: int = Field(64 * 1024 * 1024, gt=0)
    max_image_bytes: int = Field(8 * 1024 * 1024, gt=0)
    max_image_pixels: int | None = Field(
        None, gt=0, description="Pixel limit read from the header before any decode; unset, it follows "
                                "the model: 64x the processor's max_pixels, at most 40 M (decompression-bomb guard)")
    image_alpha: Literal["reference", "white"] = Field(
        "reference", description="reference: image files lose transparency as the reference loads them "
                                 "(convert('RGB')); white: every image is composited onto white")
    allow_image_urls: bool = False
    image_url_timeout_s: float = 10.0
    render_dpi: float = Field(144.0, gt=0, le=600, description="Resolution PDF pages are rendered at")
    max_pdf_bytes: int = Field(32 * 1024 * 1024, gt=0)
    max_pdf_pages_per_request: int = Field(64, gt=0, description="Rendered pages over all PDFs of a request")
    max_rerank_documents: int = Field(1000, gt=0)


class EmbedDefaults(_Strict):
    """What a request gets for a field it leaves out."""

    multivector_pool_factor: int = Field(
        1, ge=1, description="Hierarchical token pooling of multi-vectors (and of rerank documents): about "
                             "1/factor of the rows; 1 keeps every row")


class RouterConfig(_Strict):
    host: str = "0.0.0.0"
    port: int = 8080
    api_keys_env: str = Field("JV4_API_KEYS", description="Env var holding comma-separated API keys")
    api_keys_file: str | None = Field(None, description="File with one API key per line")
    log_level: str = "info"


class Config(_Strict):
    model_name: str = "jina-embeddings-v4"
    source: str = "jinaai/jina-embeddings-v4"
    prepared_dir: Path = Path("models/jina-embeddings-v4")
    log_dir: Path = Field(Path("logs"), description="Where `up` writes each child's log")
    router: RouterConfig = Field(default_factory=RouterConfig)
    deployments: dict[str, DeploymentConfig]
    vllm: VllmConfig = Field(default_factory=VllmConfig)
    backend: BackendSettings = Field(default_factory=BackendSettings)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    defaults: EmbedDefaults = Field(default_factory=EmbedDefaults)

    @field_validator("deployments")
    @classmethod
    def _some_deployment(cls, value: dict[str, DeploymentConfig]) -> dict[str, DeploymentConfig]:
        if not value:
            raise ValueError("at least one deployment is required")
        return value

    @property
    def tasks(self) -> list[str]:
        return list(self.deployments)

    def task_dir(self, task: str) -> Path:
        """The prepared checkpoint of one task."""
        return self.prepared_dir / task

    def served_name(self, task: str) -> str:
        return f"{self.model_name}-{task}"


def _child_key(node: dict[str, Any], part: str) -> str:
    """Env names cannot hold '-': JV4__DEPLOYMENTS__TEXT_MATCHING__URLS names 'text-matching'."""
    key = part.lower()
    dashed = key.replace("_", "-")
    return dashed if key not in node and dashed in node else key


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX):].split("__")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(_child_key(node, part), {})
        node[_child_key(node, parts[-1])] = yaml.safe_load(raw) if raw else raw
    return data


def load_config(path: str | Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read a YAML config (or none: defaults plus environment) and apply ``JV4__`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the config must be a mapping")
    data = _apply_env(data, os.environ if environ is None else environ)
    return Config.model_validate(data)
