"""Service configuration: one YAML file, every key overridable from the environment.

Environment twins (read by pydantic-settings): ``JV4__SECTION__KEY=value`` overrides
``section.key``, sections nested with ``__``. Field names match in any case
(``JV4__ROUTER__PORT``); keys inside mappings keep their case as written
(``JV4__VLLM__ENV__VLLM_CPU_KVCACHE_SPACE=4`` sets ``vllm.env["VLLM_CPU_KVCACHE_SPACE"]``),
and deployment keys are task names, so ``JV4__DEPLOYMENTS__TEXT_MATCHING__URLS`` names
``text-matching`` with or without a YAML file. Lists and mappings are written as JSON
(``JV4__VLLM__EXTRA_ARGS='["--enforce-eager"]'``); numbers are accepted where strings are
meant. A bad value is a :class:`ConfigError` of one line naming the variable. Config is
read when a command starts, never at import time.
"""

from __future__ import annotations

import json
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import EnvSettingsSource, SettingsError

__all__ = [
    "BackendSettings",
    "Config",
    "ConfigError",
    "DeploymentConfig",
    "EmbedDefaults",
    "LimitsConfig",
    "RouterConfig",
    "VllmConfig",
    "load_config",
]

ENV_PREFIX = "JV4__"


class _Strict(BaseModel):
    # numbers where strings are meant: `VLLM_CPU_KVCACHE_SPACE: 4` in YAML, `--max-num-seqs, 8` in extra_args
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


class DeploymentConfig(_Strict):
    """Where one task's vLLM replicas live. ``dns+http://name:port`` resolves to every address."""

    urls: list[str] = Field(min_length=1, description="Replica base URLs, or dns+http://host:port")
    port: int | None = Field(None, description="Port used when this machine starts the deployment")
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment of this task's locally started servers, over vllm.env "
                                          "(e.g. CUDA_VISIBLE_DEVICES: one GPU per adapter on one machine)")
    min_replicas: int = Field(1, ge=1, description="Fewest vLLM pods of the task (the manifests' autoscaler)")
    max_replicas: int | None = Field(
        None, ge=1, description="Most vLLM pods of the task; above min_replicas, `jv4-vllm k8s` renders an "
                                "autoscaler on the task's demand (unset: a fixed min_replicas)")

    @model_validator(mode="after")
    def _replica_range(self) -> "DeploymentConfig":
        if self.max_replicas is not None and self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        return self


class VllmConfig(_Strict):
    """How vLLM servers are started (shared by serve-adapter, up and the manifests)."""

    dtype: str = Field("bfloat16", description="vLLM --dtype (float32 gives exact parity on CPU)")
    max_model_len: int = Field(32768, gt=0, description="vLLM --max-model-len: the longest prompt in tokens")
    extra_args: list[str] = Field(default_factory=list, description="More vLLM arguments, appended as given")
    env: dict[str, str] = Field(default_factory=dict, description="Environment for locally started servers")
    image: str = Field("vllm/vllm-openai:v0.32.0", description="Container image used by the manifests")


class BackendSettings(_Strict):
    """How the engine talks to vLLM."""

    wire_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="dtype of the hidden states vLLM sends (bfloat16 for bf16 models on GPUs)")
    max_batch_tokens: int = Field(8192, gt=0, description="Token budget of one /pooling call")
    max_batch_items: int = Field(64, gt=0, description="Texts in one /pooling call at most")
    tokens_in_flight_per_replica: int = Field(
        65536, gt=0, description="Prompt tokens in flight per healthy replica (admission budget of a task)")
    max_queue: int = Field(1024, ge=0, description="Requests waiting for admission before 429")
    late_chunking_overlap: int = Field(256, ge=0, description="Tokens of context shared by long late-chunking windows")
    connect_timeout_s: float = Field(5.0, gt=0, description="Seconds to connect to a vLLM replica")
    request_timeout_s: float = Field(300.0, gt=0, description="Seconds one /pooling call may take")
    health_interval_s: float = Field(2.0, gt=0, description="Seconds between health probes of each replica")
    dns_refresh_s: float = Field(10.0, gt=0, description="Seconds between lookups of dns+ URLs")
    dns_server: str | None = Field(None, description="DNS server host:port for dns+ URLs (default: system resolver)")
    startup_timeout_s: float = Field(600.0, gt=0, description="Seconds `up` waits for the deployments to be ready")


class LimitsConfig(_Strict):
    """Admission limits of the router (and the direct client's checks)."""

    max_inputs_per_request: int = Field(2048, gt=0, description="Inputs in one request at most (413 past it)")
    max_request_tokens: int = Field(
        1 << 20, gt=0, description="Prompt tokens of one request at most (413 past it); images count their tokens")
    max_request_bytes: int = Field(64 * 1024 * 1024, gt=0, description="Request body bytes at most (413 past it)")
    max_image_bytes: int = Field(8 * 1024 * 1024, gt=0, description="Bytes of one image file at most")
    max_image_pixels: int | None = Field(
        None, gt=0, description="Pixel limit read from the header before any decode; unset, it follows "
                                "the model: 64x the processor's max_pixels, at most 40 M (decompression-bomb guard)")
    image_alpha: Literal["reference", "white"] = Field(
        "reference", description="reference: image files lose transparency as the reference loads them "
                                 "(convert('RGB')); white: every image is composited onto white")
    allow_image_urls: bool = Field(False, description="Fetch http(s) image and PDF URLs (public addresses only)")
    image_url_timeout_s: float = Field(10.0, gt=0, description="Seconds to fetch one image or PDF URL")
    render_dpi: float = Field(144.0, gt=0, le=600, description="Resolution PDF pages are rendered at")
    max_pdf_bytes: int = Field(32 * 1024 * 1024, gt=0, description="Bytes of one PDF file at most")
    max_pdf_pages_per_request: int = Field(64, gt=0, description="Rendered pages over all PDFs of a request")
    max_rerank_documents: int = Field(1000, gt=0, description="Documents of one rerank request at most")
    max_kept_pdf_bytes: int = Field(
        128 * 1024 * 1024, ge=0, description="PDF bytes the router keeps for the caller's later page batches "
                                             "(the client uploads a PDF once); 0 keeps none")
    max_bytes_in_flight: int = Field(
        256 * 1024 * 1024, gt=0,
        description="Request body bytes the router holds at once (bodies being read and everything parsed, decoded "
                    "and sent from them lives only as long as its body); a request that does not fit waits with its "
                    "body unread, one larger than this is a 413. The router's request memory is a small multiple "
                    "of it (docs/protection.md): 256 MiB suits a 2 Gi pod")
    max_url_fetches: int = Field(16, gt=0, description="Image and PDF URL downloads at once (each within "
                                                       "image_url_timeout_s); they wait on the network, not the CPU")
    image_decode_workers: int | None = Field(
        None, gt=0, description="Threads decoding and checking images; unset, one per CPU core")
    pdf_render_workers: int = Field(1, gt=0, description="Threads rendering PDF pages (PDFium runs one page at a "
                                                         "time per process whatever this is)")
    pdf_render_timeout_s: float = Field(
        30.0, gt=0, description="Render time of one PDF document at most (a 4xx naming it past that); checked "
                                "between pages")


class EmbedDefaults(_Strict):
    """What a request gets for a field it leaves out."""

    multivector_pool_factor: int = Field(
        1, ge=1, description="Hierarchical token pooling of multi-vectors (and of rerank documents): about "
                             "1/factor of the rows; 1 keeps every row")


class RouterConfig(_Strict):
    """Where the router listens and who may call it."""

    host: str = Field("0.0.0.0", description="Address the router binds")
    port: int = Field(8080, ge=0, lt=65536, description="Port the router listens on")
    api_keys_env: str = Field("JV4_API_KEYS", description="Env var holding comma-separated API keys")
    api_keys_file: str | None = Field(None, description="File with one API key per line")
    log_level: str = Field("info", description="debug, info, warning or error")
    shutdown_grace_s: float = Field(
        300.0, ge=0, description="On SIGTERM: how long requests already accepted may run before the router exits "
                                 "(it exits as soon as none is left); the manifests' terminationGracePeriodSeconds "
                                 "covers it")
    peers: list[str] = Field(
        default_factory=list,
        description="Every router of the fleet (this one included) as base URLs, or one dns+http://name:port "
                    "resolving to all of them: the routers then share each task's budget. Empty: alone")


class Config(_Strict):
    """The whole service: one YAML file (``configs/*.yaml``) plus its ``JV4__`` environment twins."""

    model_name: str = Field("jina-embeddings-v4", description="What clients send as `model`")
    source: str = Field("jinaai/jina-embeddings-v4", description="Checkpoint `prepare` reads: a Hugging Face id "
                                                                 "or a local directory")
    prepared_dir: Path = Field(Path("models/jina-embeddings-v4"), description="Where `prepare` writes one "
                                                                              "checkpoint per task, one subdirectory each")
    log_dir: Path = Field(Path("logs"), description="Where `up` writes each child's log")
    router: RouterConfig = Field(default_factory=RouterConfig, description="The router's address and API keys")
    deployments: dict[str, DeploymentConfig] = Field(
        description="One vLLM deployment per task, keyed by task name (retrieval, text-matching, code)")
    vllm: VllmConfig = Field(default_factory=VllmConfig, description="How vLLM servers are started")
    backend: BackendSettings = Field(default_factory=BackendSettings, description="How the engine talks to vLLM")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Admission limits of every request")
    defaults: EmbedDefaults = Field(default_factory=EmbedDefaults,
                                    description="What a request gets for a field it leaves out")

    @field_validator("deployments")
    @classmethod
    def _some_deployment(cls, value: dict[str, DeploymentConfig]) -> dict[str, DeploymentConfig]:
        if not value:
            raise ValueError("at least one deployment is required")
        return value

    @property
    def tasks(self) -> list[str]:
        """The served tasks, in config order."""
        return list(self.deployments)

    def task_dir(self, task: str) -> Path:
        """The prepared checkpoint of one task."""
        return self.prepared_dir / task

    def server_env(self, task: str) -> dict[str, str]:
        """The environment a locally started vLLM server of ``task`` gets on top of the caller's."""
        return {**self.vllm.env, **self.deployments[task].env}

    def served_name(self, task: str) -> str:
        """The name vLLM serves one task's checkpoint under (``<model>-<task>``)."""
        return f"{self.model_name}-{task}"




# --- loading -----------------------------------------------------------------------------

_TASK_KEYED = ("deployments",)  # mappings keyed by task name: env spellings lowercased, '_' read as '-'


class ConfigError(ValueError):
    """A config file or environment twin that does not validate; the message is one line."""


class _EnvTwins(EnvSettingsSource):
    """pydantic-settings' environment source over ``environ``, each ``JV4__`` name first spelled
    as the models spell it: field names in their own case, mapping keys as written (so
    ``vllm.env`` keeps ``VLLM_CPU_KVCACHE_SPACE``), task keys dashed. Matching stays
    case-sensitive after that, so nothing is lowercased behind the caller's back."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.spelled: dict[str, str] = {}  # model spelling -> the variable as the caller wrote it
        self._environ = environ
        # Config is a plain model (tests and tools build it directly): only its loading reads the environment
        super().__init__(Config, case_sensitive=True, env_prefix=ENV_PREFIX,  # type: ignore[arg-type]
                         env_nested_delimiter="__")

    def _load_env_vars(self) -> Mapping[str, str | None]:
        for name in self._environ:
            if name.startswith("JV4_") and not name.startswith(ENV_PREFIX) and "__" in name:
                raise ConfigError(f"{name}: config twins start with {ENV_PREFIX} (two underscores), "
                                  f"e.g. {ENV_PREFIX}{name[4:].lstrip('_')}")
        found = {}
        for name, value in self._environ.items():
            if name.startswith(ENV_PREFIX):
                spelled = ENV_PREFIX + "__".join(_spell(name[len(ENV_PREFIX):].split("__"), name))
                self.spelled[spelled] = name
                found[spelled] = value
        return found


def _spell(parts: list[str], name: str) -> list[str]:
    """``["VLLM", "ENV", "VLLM_X"]`` -> ``["vllm", "env", "VLLM_X"]``, following the models' fields."""
    spelled: list[str] = []
    node: Any = Config  # a model class, a mapping type, or anything else (a value)
    task_keys = False
    for part in parts:
        if not part:
            raise ConfigError(f"{name}: an empty key between '__'")
        if isinstance(node, type) and issubclass(node, BaseModel):
            field = next((f for f in node.model_fields if f.lower() == part.lower()), None)
            if field is None:
                where = ".".join(spelled) or "the config"
                raise ConfigError(f"{name}: {where} has no key {part.lower()!r} (keys: {', '.join(node.model_fields)})")
            spelled.append(field)
            node, task_keys = _without_none(node.model_fields[field].annotation), field in _TASK_KEYED
        elif typing.get_origin(node) is dict:
            spelled.append(part.lower().replace("_", "-") if task_keys else part)
            node, task_keys = _without_none(typing.get_args(node)[1]), False
        else:
            raise ConfigError(f"{name}: {'.'.join(spelled)} is a value, not a section")
    return spelled


def _without_none(annotation: Any) -> Any:
    """``X | None`` -> ``X``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if isinstance(annotation, types.UnionType) and len(args) == 1 else annotation


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``, mappings merged key by key."""
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(
            merged.get(key), dict) else value
    return merged


def _one_line(error: ValidationError, origin: str, spelled: Mapping[str, str], env: Mapping[str, Any]) -> str:
    """Each problem as ``where (from JV4__X='v'): what``, joined on one line."""
    problems = []
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        twins = [name for model_name, name in spelled.items()
                 if model_name[len(ENV_PREFIX):].split("__") == loc[:len(model_name[len(ENV_PREFIX):].split("__"))]]
        source = f" (from {twins[0]}={env[twins[0]]!r})" if twins else f" (in {origin})"
        problems.append(f"{'.'.join(loc) or 'config'}{source}: {item['msg']}")
    return "; ".join(problems)


def _json_problem(error: SettingsError, spelled: Mapping[str, str], env: Mapping[str, Any]) -> str:
    """Which variable held a list or mapping that is not JSON (pydantic-settings names only the field)."""
    field = str(error).split('"')[1] if str(error).count('"') >= 2 else ""
    culprits = []
    for model_name, name in spelled.items():
        if model_name[len(ENV_PREFIX):].split("__")[0] == field:
            try:
                json.loads(env[name])
            except ValueError:
                if env[name].lstrip()[:1] in "[{":
                    culprits.append(f"{name}={env[name]!r}")
    where = ", ".join(culprits) or f"a {ENV_PREFIX}{field.upper()}__... variable"
    return f"{where}: not valid JSON (lists and mappings are written as JSON, e.g. '[\"a\", \"b\"]')"


def load_config(path: str | Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read a YAML config (or none: defaults plus environment) and apply the ``JV4__`` twins over it.

    Raises :class:`ConfigError` (one line) for an unreadable file or a value that does not validate.
    """
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the config must be a mapping")
    twins = _EnvTwins(environ)
    try:
        overrides = twins()
    except SettingsError as exc:
        raise ConfigError(_json_problem(exc, twins.spelled, environ)) from None
    try:
        return Config.model_validate(_merge(data, overrides))
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, str(path or "defaults"), twins.spelled, environ)) from None
