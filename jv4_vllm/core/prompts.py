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

HEAD_CHARS_PER_TOKEN = 8  # first guess of characters per token when tokenising the head of a long text
_SAFE_WINDOW = 4096  # how far back from the wanted length to look for a safe cut


def _safe_cut(text: str, near: int) -> int | None:
    """A position at most ``near`` where a letter or digit is followed by a space, or None."""
    stop = min(near, len(text) - 1)
    for position in range(stop, max(0, stop - _SAFE_WINDOW), -1):
        if text[position] == " " and text[position - 1].isalnum():
            return position
    return None


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

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    def tokenize_texts(self, texts: Sequence[str], role: Role) -> list[list[int]]:
        """Token ids of each text's full prompt (prefix included)."""
        encodings = self._tokenizer.encode_batch_fast([self.text_prompt(t, role) for t in texts])
        return [encoding.ids for encoding in encodings]

    def tokenize_capped(self, texts: Sequence[str], role: Role, limit: int) -> list[list[int]]:
        """Token ids of each prompt, but at most ``limit + 1`` of them: exactly the first tokens of the
        full tokenisation, found without tokenising all of a long text (``limit + 1`` means "too long").

        A prompt of at most ``limit`` UTF-8 bytes cannot have more tokens than that (byte-level BPE),
        so short texts are tokenised whole. A long text is tokenised a growing head at a time, cut
        where a letter or digit meets a space: the pre-tokenizer never joins across that point, so
        the head's tokens are the full text's first tokens.
        """
        prompts = [self.text_prompt(t, role) for t in texts]
        short = [i for i, p in enumerate(prompts) if len(p) <= limit and len(p.encode("utf-8")) <= limit]
        out: list[list[int]] = [[] for _ in prompts]
        for i, encoding in zip(short, self._tokenizer.encode_batch_fast([prompts[i] for i in short])):
            out[i] = encoding.ids
        for i in sorted(set(range(len(prompts))) - set(short)):
            out[i] = self._head_ids(prompts[i], limit + 1)
        return out

    def _head_ids(self, prompt: str, count: int) -> list[int]:
        """The first ``count`` token ids of ``prompt`` (all of them when it has fewer)."""
        chars = max(count * HEAD_CHARS_PER_TOKEN, 1024)
        while chars < len(prompt):
            cut = _safe_cut(prompt, chars)
            if cut is None:
                break
            ids = self._tokenizer.encode(prompt[:cut], add_special_tokens=False).ids
            if len(ids) >= count:
                return ids[:count]
            chars *= 2
        return self._tokenizer.encode(prompt, add_special_tokens=False).ids[:count]

    def image_tokens(self, image: ImageInput) -> int:
        """Prompt tokens of an image's prompt: the vision span plus the chat text around it."""
        layout = self.image_layout
        return layout.prefix_tokens + layout.suffix_tokens + 2 + self.spec.image.tokens(image.width, image.height)

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
