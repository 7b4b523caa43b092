"""The HTTP router: one OpenAI- and Jina-compatible endpoint over the engine."""

from jv4_vllm.router.app import create_app, run

__all__ = ["create_app", "run"]
