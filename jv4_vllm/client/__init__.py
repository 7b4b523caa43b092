"""The public Python client: through a router over HTTP, or the engine in-process."""

from jv4_vllm.client.aio import AsyncClient, DenseAndMulti
from jv4_vllm.client.sync import Client

__all__ = ["AsyncClient", "Client", "DenseAndMulti"]
