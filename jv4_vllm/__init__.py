"""Serve jina-embeddings-v4 on vLLM: all adapters, text and images, single and multi-vector.

The root is lazy: ``import jv4_vllm.router`` or ``import jv4_vllm.errors`` loads only what
that module needs, and the names below are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from jv4_vllm._version import __version__

if TYPE_CHECKING:
    from jv4_vllm.client import AsyncClient, Client, DenseAndMulti, Embeddings, RerankHit, Retries
    from jv4_vllm.config import Config, load_config
    from jv4_vllm.core.scoring import maxsim
    from jv4_vllm.errors import (
        AuthenticationError,
        BackendError,
        BackendTimeoutError,
        BackendUnavailableError,
        InputTooLongError,
        InvalidRequestError,
        Jv4Error,
        ModelNotFoundError,
        OverloadedError,
        PayloadTooLargeError,
        ServiceUnreachableError,
    )

_EXPORTS = {
    **{name: "jv4_vllm.client" for name in ("AsyncClient", "Client", "DenseAndMulti", "Embeddings", "RerankHit",
                                            "Retries")},
    "Config": "jv4_vllm.config",
    "load_config": "jv4_vllm.config",
    "maxsim": "jv4_vllm.core.scoring",
    **{name: "jv4_vllm.errors" for name in (
        "AuthenticationError", "BackendError", "BackendTimeoutError", "BackendUnavailableError",
        "InputTooLongError", "InvalidRequestError", "Jv4Error", "ModelNotFoundError", "OverloadedError",
        "PayloadTooLargeError", "ServiceUnreachableError")},
}

__all__ = [
    "AsyncClient",
    "AuthenticationError",
    "BackendError",
    "BackendTimeoutError",
    "BackendUnavailableError",
    "Client",
    "Config",
    "DenseAndMulti",
    "Embeddings",
    "InputTooLongError",
    "InvalidRequestError",
    "Jv4Error",
    "ModelNotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "RerankHit",
    "Retries",
    "ServiceUnreachableError",
    "__version__",
    "load_config",
    "maxsim",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jv4_vllm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
