"""The public Python client: through a router over HTTP, or the engine in-process."""

from jv4_vllm.client.clients import AsyncClient, Client

__all__ = ["AsyncClient", "Client"]
