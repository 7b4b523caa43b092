"""Reference encoder: the transformers oracle for jina-embeddings-v4.

It loads the UNMERGED source checkpoint and applies each task's LoRA pairs on
the fly (never merged into the weights), so comparing it with a prepared
(merged) checkpoint checks the merge instead of repeating it. Prompts and
pooling follow the published model exactly; everything is pooled in float32.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import nn
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
)

from jv4_vllm.oracle.upstream_images import ReferenceImage, load_reference_image

__all__ = ["JINA_TEXT_MAX_LENGTH", "ImageInput", "ReferenceEncoder"]

ImageInput = ReferenceImage
JINA_TEXT_MAX_LENGTH = 32768  # the reference processor never keeps more text tokens than this

ROLES = ("query", "passage")
IMAGE_PROMPT_TEXT = "Describe the image."
_PROJECTOR = "multi_vector_projector"
_Batch = Mapping[str, torch.Tensor]
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<ab>[AB])\.(?P<task>[^.]+)\.weight$")


def text_prefix(task: str, prompt_name: str) -> str:
    """The prefix the model was trained with: text-matching is symmetric, so always 'Query: '."""
    if prompt_name not in ROLES:
        raise ValueError(f"prompt_name must be one of {list(ROLES)}, got {prompt_name!r}")
    if task == "text-matching" or prompt_name == "query":
        return "Query: "
    return "Passage: "


class _ActiveTask:
    """Which task's LoRA pair every wrapped layer applies; shared by all of them."""

    name: str | None = None


class LoraLinear(nn.Module):
    """A frozen Linear plus one LoRA pair per task, applied on the fly: base(x) + s * (x A^T) B^T."""

    def __init__(self, base: nn.Linear, scaling: float, active: _ActiveTask) -> None:
        super().__init__()
        self.base = base
        self.scaling = scaling
        self.active = active
        self.lora_a = nn.ParameterDict()
        self.lora_b = nn.ParameterDict()

    def add_pair(self, task: str, a: torch.Tensor, b: torch.Tensor) -> None:
        dtype, device = self.base.weight.dtype, self.base.weight.device
        if a.shape[1] != self.base.in_features or b.shape[0] != self.base.out_features or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"LoRA pair for task {task!r} has shapes A{tuple(a.shape)} B{tuple(b.shape)}, "
                f"which do not fit Linear({self.base.in_features} -> {self.base.out_features})"
            )
        self.lora_a[task] = nn.Parameter(a.to(device, dtype), requires_grad=False)
        self.lora_b[task] = nn.Parameter(b.to(device, dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        task = self.active.name
        if task is None or task not in self.lora_a:
            raise RuntimeError(f"no LoRA pair for task {task!r} on this layer")
        a, b = self.lora_a[task], self.lora_b[task]
        return self.base(x) + self.scaling * ((x.to(a.dtype) @ a.T) @ b.T).to(x.dtype)


def _resolve_source(source: str | Path) -> Path:
    path = Path(source)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(source)))


def _weight_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [root / n for n in names]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {root}")
    return files


def _read_tensors(files: Sequence[Path], suffixes: Sequence[str]) -> dict[str, torch.Tensor]:
    """Tensors whose key ends with one of `suffixes`, keyed by that suffix."""
    found: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                for suffix in suffixes:
                    if key == suffix or key.endswith("." + suffix):
                        found[suffix] = f.get_tensor(key)
    return found


def _lora_scaling(adapter_config: dict) -> float:
    if adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern"):
        raise ValueError("per-module LoRA rank/alpha patterns are not supported")
    r, alpha = adapter_config["r"], adapter_config["lora_alpha"]
    return alpha / math.sqrt(r) if adapter_config.get("use_rslora") else alpha / r


def _module_candidates(path: str) -> list[str]:
    """Module names a LoRA path may denote in transformers 5 (which nests the text decoder)."""
    candidates = [path]
    if path.startswith("model.") and not path.startswith(("model.language_model.", "model.visual.")):
        candidates.append("model.language_model." + path[len("model.") :])
    if path.startswith("visual."):
        candidates.append("model." + path)
    if path.startswith("language_model."):
        candidates.append("model." + path)
    return candidates


def _load_lora(root: Path) -> tuple[float, dict[str, dict[str, dict[str, torch.Tensor]]]]:
    """Scaling and pairs as {module path: {task: {"A": .., "B": ..}}}."""
    adapter_dir = root / "adapters"
    scaling = _lora_scaling(json.loads((adapter_dir / "adapter_config.json").read_text()))
    pairs: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            match = _LORA_KEY.match(key)
            if match is None:
                raise ValueError(f"unexpected adapter tensor {key!r}")
            pairs.setdefault(match["path"], {}).setdefault(match["task"], {})[match["ab"]] = f.get_tensor(key)
    for path, tasks in pairs.items():
        for task, pair in tasks.items():
            if set(pair) != {"A", "B"}:
                raise ValueError(f"incomplete LoRA pair for {path} task {task!r}")
    return scaling, pairs


class ReferenceEncoder:
    """jina-embeddings-v4 on transformers, with task adapters applied on the fly."""

    def __init__(self, source: str | Path, dtype: torch.dtype = torch.float32, batch_size: int = 8,
                 max_length: int | None = None) -> None:
        """``max_length``: the most text tokens kept (prefix included); give a deployment's own
        limit, min(max_model_len, max_position_embeddings), to compare with it."""
        root = _resolve_source(source)
        self.batch_size = batch_size
        self.config = Qwen2_5_VLConfig.from_pretrained(root)
        self.task_names: list[str] = list(self.config.task_names)
        self.matryoshka_dims: list[int] = [int(d) for d in self.config.matryoshka_dims]
        self.hidden_size: int = self.config.text_config.hidden_size
        mpe = self.config.text_config.max_position_embeddings
        self.max_length: int = min(max_length or JINA_TEXT_MAX_LENGTH, JINA_TEXT_MAX_LENGTH, mpe)

        model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            root, config=self.config, dtype=dtype, output_loading_info=True
        )
        missing = [k for k in info["missing_keys"] if not k.startswith("lm_head.")]
        unexpected = [k for k in info["unexpected_keys"] if _PROJECTOR not in k]
        if missing or unexpected or info["mismatched_keys"]:
            raise ValueError(
                f"source weights do not fit Qwen2.5-VL: missing={missing[:5]} unexpected={unexpected[:5]} "
                f"mismatched={list(info['mismatched_keys'])[:5]}"
            )
        self.model = model.eval()
        self.dtype = dtype
        self.processor = Qwen2_5_VLProcessor.from_pretrained(root)
        self.processor.tokenizer.padding_side = "right"
        self._active = _ActiveTask()
        self.projector = self._attach_adapters(root)
        self._image_prompt = self._build_image_prompt()

    # ---- loading -------------------------------------------------------------------------------

    def _attach_adapters(self, root: Path) -> LoraLinear:
        """Wrap every adapted Linear; return the task-adapted multi-vector projector (fp32)."""
        scaling, pairs = _load_lora(root)
        base = _read_tensors(_weight_files(root), [f"{_PROJECTOR}.weight", f"{_PROJECTOR}.bias"])
        if len(base) != 2:
            raise ValueError(f"source weights lack {_PROJECTOR}.weight/.bias")
        weight, bias = base[f"{_PROJECTOR}.weight"], base[f"{_PROJECTOR}.bias"]
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=True, dtype=torch.float32)
        with torch.no_grad():
            linear.weight.copy_(weight.float())
            linear.bias.copy_(bias.float())
        projector = LoraLinear(linear, scaling, self._active)

        modules = dict(self.model.named_modules())
        if _PROJECTOR not in pairs:
            raise ValueError(f"adapters hold no LoRA pair for {_PROJECTOR}")
        targets = {path: projector if path == _PROJECTOR else self._wrap(path, modules, scaling) for path in pairs}
        for path, tasks in pairs.items():
            missing = set(self.task_names) - set(tasks)
            if missing:
                raise ValueError(f"LoRA module {path!r} has no pair for tasks {sorted(missing)}")
            for task, pair in tasks.items():
                targets[path].add_pair(task, pair["A"], pair["B"])
        return projector

    def _wrap(self, path: str, modules: dict[str, nn.Module], scaling: float) -> LoraLinear:
        """Replace the Linear that LoRA `path` adapts with a LoraLinear around it."""
        name = next((c for c in _module_candidates(path) if c in modules), None)
        if name is None or not isinstance(modules[name], nn.Linear):
            raise ValueError(f"LoRA module {path!r} matches no Linear in the model")
        wrapper = LoraLinear(modules[name], scaling, self._active)
        parent, _, child = name.rpartition(".")
        setattr(modules[parent], child, wrapper)
        return wrapper

    def _token(self, token_id: int) -> str:
        return self.processor.tokenizer.convert_ids_to_tokens(int(token_id))

    def _special(self, token: str) -> str:
        token_id = self.processor.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or self._token(token_id) != token:
            raise ValueError(f"tokenizer lacks special token {token!r}")
        return token

    def _build_image_prompt(self) -> str:
        cfg = self.config
        return (
            f"{self._special('<|im_start|>')}user\n"
            f"{self._token(cfg.vision_start_token_id)}{self._token(cfg.image_token_id)}"
            f"{self._token(cfg.vision_end_token_id)}{IMAGE_PROMPT_TEXT}{self._special('<|im_end|>')}\n"
        )

    # ---- inputs --------------------------------------------------------------------------------

    def _check_task(self, task: str) -> None:
        if task not in self.task_names:
            raise ValueError(f"unknown task {task!r}; choose one of {self.task_names}")

    def _text_batches(
        self, texts: Sequence[str], task: str, prompt_name: str, max_length: int | None
    ) -> Iterator[_Batch]:
        self._check_task(task)
        prefix = text_prefix(task, prompt_name)
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not a string")
        for start in range(0, len(texts), self.batch_size):
            chunk = [prefix + t for t in texts[start : start + self.batch_size]]
            yield self.processor.tokenizer(
                chunk,
                padding="longest",
                truncation=True,
                max_length=min(max_length or self.max_length, self.max_length),
                return_tensors="pt",
            )

    def _image_batches(self, images: Sequence[ImageInput], task: str) -> Iterator[_Batch]:
        self._check_task(task)
        for start in range(0, len(images), self.batch_size):
            chunk = [load_reference_image(im) for im in images[start : start + self.batch_size]]
            yield self.processor(
                text=[self._image_prompt] * len(chunk), images=chunk, padding="longest", return_tensors="pt"
            )

    def text_token_ids(self, texts: Sequence[str], task: str = "retrieval", prompt_name: str = "query",
                       max_length: int | None = None) -> list[list[int]]:
        """Token ids of each prompted text, without padding."""
        return [ids for batch in self._text_batches(texts, task, prompt_name, max_length) for ids in _unpad(batch)]

    def image_token_ids(self, images: Sequence[ImageInput], task: str = "retrieval") -> list[list[int]]:
        """Token ids of each image prompt (image pads expanded), without padding."""
        return [ids for batch in self._image_batches(images, task) for ids in _unpad(batch)]

    # ---- forward -------------------------------------------------------------------------------

    @torch.inference_mode()
    def _hidden(self, batches: Iterator[_Batch], task: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """(token ids, fp32 last hidden states) per item, padding removed."""
        self._active.name = task
        out: list[tuple[np.ndarray, np.ndarray]] = []
        try:
            for batch in batches:
                inputs = {k: v for k, v in batch.items() if k != "token_type_ids"}
                hidden = self.model.model(**inputs, use_cache=False).last_hidden_state.float()
                for row, mask, ids in zip(hidden, batch["attention_mask"].bool(), batch["input_ids"]):
                    out.append((ids[mask].numpy(), row[mask].numpy()))
        finally:
            self._active.name = None
        return out

    def text_hidden_states(self, texts: Sequence[str], task: str = "retrieval", prompt_name: str = "query",
                           max_length: int | None = None) -> list[np.ndarray]:
        """Raw last hidden states [n_tokens, H] (fp32) per prompted text."""
        return [h for _, h in self._hidden(self._text_batches(texts, task, prompt_name, max_length), task)]

    def image_hidden_states(self, images: Sequence[ImageInput], task: str = "retrieval") -> list[np.ndarray]:
        """Raw last hidden states [n_tokens, H] (fp32) per image prompt."""
        return [h for _, h in self._hidden(self._image_batches(images, task), task)]

    def token_hidden_states(self, token_ids: Sequence[int], task: str = "retrieval") -> np.ndarray:
        """Raw last hidden states [n_tokens, H] (fp32) of one prompt given as token ids, nothing added:
        for checks that feed exactly the ids the service sends (late-chunking windows)."""
        self._check_task(task)
        ids = torch.tensor([list(token_ids)], dtype=torch.long)
        return self._hidden(iter([{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]), task)[0][1]

    # ---- encoding ------------------------------------------------------------------------------

    def encode_text(self, texts: Sequence[str], task: str = "retrieval", prompt_name: str = "query",
                    truncate_dim: int | None = None, return_multivector: bool = False,
                    max_length: int | None = None) -> np.ndarray | list[np.ndarray]:
        """Single vectors [n, d] (mean over all tokens) or multi-vectors [n_tokens, P] per text."""
        self._check_output(truncate_dim, return_multivector)
        items = self._hidden(self._text_batches(texts, task, prompt_name, max_length), task)
        if return_multivector:
            return [self._multivector(h, task) for _, h in items]
        return self._single([h.mean(axis=0, dtype=np.float32) for _, h in items], truncate_dim)

    def encode_image(self, images: Sequence[ImageInput], task: str = "retrieval", truncate_dim: int | None = None,
                     return_multivector: bool = False) -> np.ndarray | list[np.ndarray]:
        """Single vectors [n, d] (mean over the vision span) or multi-vectors [n_tokens, P] per image."""
        self._check_output(truncate_dim, return_multivector)
        items = self._hidden(self._image_batches(images, task), task)
        if return_multivector:
            return [self._multivector(h, task) for _, h in items]
        return self._single([self._vision_span(ids, h).mean(axis=0, dtype=np.float32) for ids, h in items],
                            truncate_dim)

    def _check_output(self, truncate_dim: int | None, return_multivector: bool) -> None:
        if return_multivector and truncate_dim is not None:
            raise ValueError("return_multivector and truncate_dim cannot be combined")
        if truncate_dim is not None and truncate_dim not in self.matryoshka_dims:
            raise ValueError(f"truncate_dim {truncate_dim} is not one of the Matryoshka dims {self.matryoshka_dims}")

    def _vision_span(self, ids: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        """Rows from the first vision_start to the first vision_end, both included."""
        start = np.flatnonzero(ids == self.config.vision_start_token_id)
        end = np.flatnonzero(ids == self.config.vision_end_token_id)
        if not len(start) or not len(end) or end[0] < start[0]:
            raise ValueError("image prompt lacks a vision_start ... vision_end span")
        return hidden[start[0] : end[0] + 1]

    def _single(self, pooled: list[np.ndarray], truncate_dim: int | None) -> np.ndarray:
        if not pooled:
            return np.zeros((0, truncate_dim or self.hidden_size), np.float32)
        vectors = _l2(np.stack(pooled).astype(np.float32))
        if truncate_dim is not None:
            vectors = _l2(vectors[:, :truncate_dim])
        return vectors

    @torch.inference_mode()
    def _multivector(self, hidden: np.ndarray, task: str) -> np.ndarray:
        self._active.name = task
        try:
            rows = self.projector(torch.from_numpy(hidden)).numpy()
        finally:
            self._active.name = None
        return _l2(rows.astype(np.float32))


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _unpad(batch: _Batch) -> list[list[int]]:
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
