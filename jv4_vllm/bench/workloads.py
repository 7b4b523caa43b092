"""Deterministic inputs of a fixed size: short queries, passages, images.

Texts are grown word by word until their full prompt (task prefix included) reaches the
target token count with the deployment's own tokenizer, so every path sees the same
prompts and the token counts in the report are exact. Images are smooth synthetic
scenes saved as JPEG, the way photos usually arrive.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from jv4_vllm.config import LimitsConfig
from jv4_vllm.core.images import decode_image
from jv4_vllm.core.prompts import PromptBuilder
from jv4_vllm.core.types import ImageInput, Item, Role, TextInput

__all__ = ["Workload", "build_workload"]

_WORDS = (
    "vector search ranks documents by meaning rather than exact words so a query about river banks finds "
    "passages on flood plains erosion and bridges while a question about money banks finds loans savings "
    "interest rates and branches the model reads text and images alike pools hidden states into one "
    "embedding or keeps one small vector per token for late interaction scoring where every query token "
    "looks for its best match among the document tokens and the sums decide the order of results"
).split()


@dataclass(frozen=True)
class Workload:
    """A pool of inputs of one kind; requests cycle through it."""

    name: str  # "query" | "passage" | "image"
    role: Role
    items: tuple[Item, ...]
    token_ids: tuple[tuple[int, ...], ...]  # prompt ids of text items (empty for images)

    @property
    def is_image(self) -> bool:
        return self.name == "image"

    def texts(self, indices: list[int]) -> list[str]:
        return [self.items[i].text for i in indices]  # type: ignore[union-attr]

    def images(self, indices: list[int]) -> list[ImageInput]:
        return [self.items[i] for i in indices]  # type: ignore[misc]


def _text(prompts: PromptBuilder, role: Role, target: int, rng: np.random.Generator) -> tuple[str, list[int]]:
    words: list[str] = []
    while True:
        words.append(str(rng.choice(_WORDS)))
        text = " ".join(words)
        ids = prompts.tokenize_texts([text], role)[0]
        if len(ids) >= target:
            return text, ids


def _image(size: int, rng: np.random.Generator) -> ImageInput:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    phase = rng.uniform(0, 2 * np.pi, 3)
    channels = [127 + 100 * np.sin(4 * x + 3 * y + p) for p in phase]
    pixels = np.clip(np.stack(channels, -1) + rng.normal(0, 6, (size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = (int(v) for v in rng.integers(0, size - 40, 2))
        extent = int(rng.integers(20, size // 3))
        draw.ellipse((x0, y0, x0 + extent, y0 + extent), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return decode_image(buffer.getvalue(), LimitsConfig(), 0)


def build_workload(name: str, prompts: PromptBuilder, *, count: int, query_tokens: int, passage_tokens: int,
                   image_size: int, seed: int) -> Workload:
    """``count`` distinct inputs of the named kind."""
    rng = np.random.default_rng([seed, ("query", "passage", "image").index(name)])
    if name == "image":
        return Workload(name, "query", tuple(_image(image_size, rng) for _ in range(count)), ())
    role: Role = "query" if name == "query" else "passage"
    target = query_tokens if name == "query" else passage_tokens
    pairs = [_text(prompts, role, target, rng) for _ in range(count)]
    return Workload(name, role, tuple(TextInput(t) for t, _ in pairs), tuple(tuple(ids) for _, ids in pairs))
