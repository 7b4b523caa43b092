"""The public Python client: through a router over HTTP, or the engine in-process."""

from jv4_vllm.client.aio import AsyncClient, DenseAndMulti, Embeddings
from jv4_vllm.client.retries import Retries
from jv4_vllm.client.sync import Client
from jv4_vllm.core.scoring import RerankHit

__all__ = ["AsyncClient", "Client", "DenseAndMulti", "Embeddings", "RerankHit", "Retries"]
