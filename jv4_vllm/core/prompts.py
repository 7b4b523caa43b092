"""Items -> vLLM ``/pooling`` request bodies, token-for-token the reference encoder's prompts.

Texts are tokenised here (the checkpoint's own tokenizer.json, Rust ``tokenizers``, no
torch) so the engine knows every prompt's length before sending: token-budget batching,
clear too-long errors per input, and right-side truncation identical to the reference.
Images go as a chat message through the deployment's chat template; the vision span is
found from the fixed prefix/suffix token counts of that template, computed once here.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Sequence

from tokenizers import Tokenizer

from jv4_vllm.core.spec import TaskSpec
from jv4_vllm.core.types import ImageInput, Role

__all__ = ["ImageLayout", "PromptBuilder"]


@dataclass(frozen=True, slots=True)
class ImageLayout:
    """Token counts around the image in the image prompt (vision markers not included)."""

    prefix_tokens: int  # "<|im_start|>user\n"
    suffix_tokens: int  # "Describe the image.<|im_end|>\n"


class PromptBuilder:
    """Builds prompts for one task checkpoint."""

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec
        self._tokenizer = Tokenizer.from_file(str(spec.tokenizer_file))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.image_layout = self._image_layout()

    def _token_text(self, name: str) -> str:
        text = self._tokenizer.id_to_token(self.spec.token_ids[name])
        if text is None:
            raise ValueError(f"{self.spec.directory}: token id of {name} is not in tokenizer.json")
        return text

    def _count(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def _image_layout(self) -> ImageLayout:
        im_start, im_end = self._token_text("im_start"), self._token_text("im_end")
        return ImageLayout(
            prefix_tokens=self._count(f"{im_start}user\n"),
            suffix_tokens=self._count(f"{self.spec.image_prompt_text}{im_end}\n"),
        )

    def text_prompt(self, text: str, role: Role) -> str:
        return self.spec.prefixes[role] + text

    def tokenize_texts(self, texts: Sequence[str], role: Role) -> list[list[int]]:
        """Token ids of each text's full prompt (prefix included)."""
        encodings = self._tokenizer.encode_batch([self.text_prompt(t, role) for t in texts])
        return [encoding.ids for encoding in encodings]

    @staticmethod
    def text_body(token_ids: Sequence[Sequence[int]]) -> dict[str, Any]:
        return {"input": [list(ids) for ids in token_ids], "add_special_tokens": False}

    def image_body(self, image: ImageInput) -> dict[str, Any]:
        data_uri = f"data:{image.mime};base64,{base64.b64encode(image.data).decode('ascii')}"
        content = [
            {"type": "image_url", "image_url": {"url": data_uri}},
            {"type": "text", "text": self.spec.image_prompt_text},
        ]
        return {"messages": [{"role": "user", "content": content}], "add_generation_prompt": False}

    def vision_span(self, n_rows: int) -> tuple[int, int]:
        """[start, stop) of <|vision_start|> .. <|vision_end|> (both included) in an image prompt."""
        start = self.image_layout.prefix_tokens
        stop = n_rows - self.image_layout.suffix_tokens
        if stop - start < 3:
            raise ValueError(f"image prompt of {n_rows} tokens has no vision span")
        return start, stop
