"""Checkpoint files written and read one tensor at a time, so a 7.5 GB model never sits in memory twice."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = ["MAX_SHARD_BYTES", "ShardWriter", "stream_tensors", "write_json"]

MAX_SHARD_BYTES = 2 * 1024**3


def stream_tensors(shards: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield base tensors one at a time, in file order."""
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


class ShardWriter:
    """Writes tensors to safetensors shards of bounded size, plus their index."""

    def __init__(self, folder: Path, max_bytes: int | None = None) -> None:
        self._folder, self._max_bytes = folder, max_bytes or MAX_SHARD_BYTES
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._files: list[tuple[Path, list[str]]] = []
        self._total = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self._max_bytes:
            self._flush()
        self._pending[key] = tensor.contiguous()
        self._pending_bytes += size
        self._total += size

    def close(self) -> None:
        """Name the shards and write the index.

        The index is written even for a single shard: without one vLLM loads
        every `*.safetensors` in the folder, the projector file included.
        """
        self._flush()
        weight_map = {}
        for i, (path, keys) in enumerate(self._files, start=1):
            count = len(self._files)
            name = f"model-{i:05d}-of-{count:05d}.safetensors" if count > 1 else "model.safetensors"
            path.rename(self._folder / name)
            weight_map.update(dict.fromkeys(keys, name))
        write_json(
            self._folder / "model.safetensors.index.json",
            {"metadata": {"total_size": self._total}, "weight_map": weight_map},
        )

    def _flush(self) -> None:
        if not self._pending and self._files:
            return
        path = self._folder / f"shard-{len(self._files):05d}.partial"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._files.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
