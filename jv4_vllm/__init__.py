"""Serve jina-embeddings-v4 on vLLM: all adapters, text and images, single and multi-vector."""

from .client import AsyncClient, Client
from .config import Config, load_config
from .errors import (
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
)

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AuthenticationError",
    "BackendError",
    "BackendTimeoutError",
    "BackendUnavailableError",
    "Client",
    "Config",
    "InputTooLongError",
    "InvalidRequestError",
    "Jv4Error",
    "ModelNotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "__version__",
    "load_config",
]
