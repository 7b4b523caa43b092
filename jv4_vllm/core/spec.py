"""What a prepared task checkpoint declares (``DIR/<task>/jv4.json``), loaded once at start-up."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

__all__ = ["MAX_ASPECT_RATIO", "SPEC_FILE", "ImageGeometry", "TaskSpec", "load_image_geometry", "load_task_spec"]

SPEC_FILE = "jv4.json"
MAX_ASPECT_RATIO = 200  # the Qwen2-VL processor refuses longer/shorter side ratios above this
REQUIRED_TOKENS = ("im_start", "im_end", "vision_start", "vision_end", "image_pad")


@dataclass(frozen=True, slots=True)
class ImageGeometry:
    """What the checkpoint's image processor keeps of an image (``preprocessor_config.json``)."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    merge_size: int = 2

    @property
    def factor(self) -> int:
        """Side of the pixel square that becomes one token after merging."""
        return self.patch_size * self.merge_size

    def resized(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the processor resizes to: multiples of ``factor``, pixels within bounds
        (Qwen2-VL's ``smart_resize``, step for step; it refuses aspect ratios over 200:1)."""
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise ValueError(f"aspect ratio {max(width, height) / min(width, height):.0f}:1 is over "
                             f"the model's {MAX_ASPECT_RATIO}:1")
        factor = self.factor
        h = round(height / factor) * factor  # may be 0: then the min_pixels branch scales it up
        w = round(width / factor) * factor
        if h * w > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            h = max(factor, math.floor(height / beta / factor) * factor)
            w = max(factor, math.floor(width / beta / factor) * factor)
        elif h * w < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h = math.ceil(height * beta / factor) * factor
            w = math.ceil(width * beta / factor) * factor
        return w, h

    def tokens(self, width: int, height: int) -> int:
        """Image pad tokens the image becomes in the prompt."""
        w, h = self.resized(width, height)
        return (w // self.factor) * (h // self.factor)


def load_image_geometry(directory: Path) -> ImageGeometry:
    """The image processor's bounds; the defaults are jina-embeddings-v4's."""
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        return ImageGeometry()
    raw = json.loads(path.read_text(encoding="utf-8"))
    size = raw.get("size") or {}
    default = ImageGeometry()
    return ImageGeometry(
        min_pixels=int(raw.get("min_pixels") or size.get("shortest_edge") or default.min_pixels),
        max_pixels=int(raw.get("max_pixels") or size.get("longest_edge") or default.max_pixels),
        patch_size=int(raw.get("patch_size") or default.patch_size),
        merge_size=int(raw.get("merge_size") or default.merge_size),
    )


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
    image: ImageGeometry

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
        image=load_image_geometry(directory),
    )
