"""Benchmark of the serving paths side by side (``jv4-vllm bench``); see :func:`main`."""

from jv4_vllm.bench.cli import main

__all__ = ["main"]
