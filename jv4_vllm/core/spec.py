"""What a prepared task checkpoint declares (``DIR/<task>/jv4.json``), loaded once at start-up."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

__all__ = ["SPEC_FILE", "TaskSpec", "load_task_spec"]

SPEC_FILE = "jv4.json"
REQUIRED_TOKENS = ("im_start", "im_end", "vision_start", "vision_end", "image_pad")


@dataclass(frozen=True)
class TaskSpec:
    task: str
    directory: Path
    prefixes: dict[str, str]
    image_prompt_text: str
    matryoshka_dims: tuple[int, ...]
    hidden_size: int
    projector_dim: int
    max_position_embeddings: int
    token_ids: dict[str, int]
    projector_weight: np.ndarray  # [P, H] float32, the task-effective projector
    projector_bias: np.ndarray  # [P] float32

    @property
    def tokenizer_file(self) -> Path:
        return self.directory / "tokenizer.json"


def load_task_spec(directory: str | Path) -> TaskSpec:
    """Read jv4.json and the projector; fail with the file name if the directory is not prepared."""
    directory = Path(directory)
    spec_path = directory / SPEC_FILE
    if not spec_path.is_file():
        raise FileNotFoundError(f"{spec_path} not found: run `jv4-vllm prepare` for this task first")
    raw = json.loads(spec_path.read_text(encoding="utf-8"))
    missing = [name for name in REQUIRED_TOKENS if name not in raw.get("token_ids", {})]
    if missing:
        raise ValueError(f"{spec_path}: token_ids lacks {missing}")
    tensors = load_file(str(directory / raw.get("projector", "multi_vector_projector.safetensors")))
    weight = tensors["weight"].astype(np.float32)
    bias = tensors["bias"].astype(np.float32)
    if weight.shape != (raw["projector_dim"], raw["hidden_size"]) or bias.shape != (raw["projector_dim"],):
        raise ValueError(f"{directory}: projector shapes {weight.shape}/{bias.shape} do not match jv4.json")
    return TaskSpec(
        task=raw["task"],
        directory=directory,
        prefixes=dict(raw["prefixes"]),
        image_prompt_text=raw["image_prompt_text"],
        matryoshka_dims=tuple(int(d) for d in raw["matryoshka_dims"]),
        hidden_size=int(raw["hidden_size"]),
        projector_dim=int(raw["projector_dim"]),
        max_position_embeddings=int(raw["max_position_embeddings"]),
        token_ids={k: int(v) for k, v in raw["token_ids"].items()},
        projector_weight=np.ascontiguousarray(weight),
        projector_bias=bias,
    )
