"""Benchmark of the serving paths side by side (``jv4-vllm bench``); see :func:`main`."""

from .cli import main

__all__ = ["main"]
