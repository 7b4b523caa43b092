"""Turn a jina-embeddings-v4 checkpoint into one plain Qwen2.5-VL checkpoint per task.

vLLM serves a task adapter best as merged weights (W + scaling * B @ A), so
each task directory is a `Qwen2_5_VLForConditionalGeneration` checkpoint that
both vLLM and transformers load, plus what the router needs and vLLM does not
keep: the task-effective multi-vector projector, the prompt conventions
(`jv4.json`) and a chat template that renders the reference image prompt.

The real model is 7.5 GB, so tensors are streamed one at a time and written
in bounded shards. Everything is checked before anything is written, and each
task directory appears only once it is complete.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from jv4_vllm.checkpoint.chat_template import CHAT_TEMPLATE_FILE, render_chat_template
from jv4_vllm.checkpoint.shards import ShardWriter, stream_tensors, write_json
from jv4_vllm.core.spec import SPEC_FILE

__all__ = ["prepare", "PrepareError", "IMAGE_PROMPT_TEXT"]

IMAGE_PROMPT_TEXT = "Describe the image."
PROJECTOR_FILE = "multi_vector_projector.safetensors"
PROJECTOR = "multi_vector_projector"

# Tokenizer and processor files copied verbatim when the source has them.
_SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
    "video_preprocessor_config.json", "processor_config.json", "generation_config.json",
)  # fmt: skip
# What prepare reads from a hub repo (skips e.g. ONNX exports).
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja"]
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<half>[AB])\.(?P<task>[^.]+)\.weight$")


class PrepareError(ValueError):
    """The source cannot be prepared as asked; the message says why."""


@dataclass(frozen=True)
class _Source:
    """Everything validated about the source before any output is written."""

    root: Path
    config: dict[str, Any]
    shards: list[Path]
    projector: tuple[str, str]  # base keys of the projector weight and bias
    adapter_file: Path
    scaling: float
    pairs: dict[str, dict[str, tuple[str, str]]]  # task -> base weight key -> (lora_A key, lora_B key)
    token_ids: dict[str, int]
    token_strings: dict[str, str]


def prepare(source: str | Path, out: Path, tasks: Sequence[str] | None = None) -> dict[str, Path]:
    """Write `out/<task>/` for each task (default: all of the source's tasks).

    `source` is a local checkpoint directory or a Hugging Face model id.
    Returns the written directory of each task. Raises `PrepareError` before
    writing anything if the source or the request is not usable.
    """
    src = _inspect(_resolve(source), tasks)
    out = Path(out)
    created_out = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staged: dict[str, Path] = {}
    try:
        for task in src.pairs:
            staged[task] = Path(tempfile.mkdtemp(prefix=f".{task}.", dir=out))
            _write_task(src, task, str(source), staged[task])
    except BaseException:
        for tmp in staged.values():
            shutil.rmtree(tmp, ignore_errors=True)
        if created_out and not any(out.iterdir()):
            out.rmdir()
        raise
    return {task: _publish(tmp, out / task) for task, tmp in staged.items()}


def _resolve(source: str | Path) -> Path:
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise PrepareError(f"source {source} is not a directory")
        return path
    if isinstance(source, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        try:
            return Path(snapshot_download(repo_id=source, allow_patterns=_DOWNLOAD_PATTERNS))
        except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
            raise PrepareError(f"cannot download {source} from the Hugging Face Hub: {exc}") from exc
    raise PrepareError(f"source {source} is neither a local directory nor a Hugging Face model id")


def _inspect(root: Path, tasks: Sequence[str] | None) -> _Source:
    """Validate the source and plan the merge without reading any weight data."""
    config_path = root / "config.json"
    if not config_path.is_file():
        raise PrepareError(f"{root} has no config.json: not a jina-embeddings-v4 checkpoint")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    task_names = config.get("task_names")
    if "JinaEmbeddingsV4Model" not in (config.get("architectures") or []) or not task_names:
        raise PrepareError(
            f"{root} is not a jina-embeddings-v4 checkpoint "
            "(config.json needs architectures [JinaEmbeddingsV4Model] and task_names)"
        )
    wanted = list(dict.fromkeys(task_names if tasks is None else tasks))
    unknown = [t for t in wanted if t not in task_names]
    if unknown or not wanted:
        raise PrepareError(f"unknown task(s) {unknown or wanted}; the checkpoint has {task_names}")

    adapters = root / "adapters"
    adapter_file = adapters / "adapter_model.safetensors"
    if not (adapters / "adapter_config.json").is_file() or not adapter_file.is_file():
        raise PrepareError(f"{adapters} with adapter_config.json and adapter_model.safetensors is missing")
    adapter_config = json.loads((adapters / "adapter_config.json").read_text(encoding="utf-8"))

    shards = _base_shards(root)
    shapes: dict[str, tuple[int, ...]] = {}  # every base weight key -> its shape
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            shapes.update((key, tuple(f.get_slice(key).get_shape())) for key in f.keys())
    projector = _projector_keys(shapes)
    pairs = _plan_pairs(adapter_file, wanted, shapes, projector[0], adapter_config)
    token_ids, token_strings = _special_tokens(root, config)
    return _Source(
        root=root,
        config=config,
        shards=shards,
        projector=projector,
        adapter_file=adapter_file,
        scaling=_scaling(adapter_config),
        pairs=pairs,
        token_ids=token_ids,
        token_strings=token_strings,
    )


def _base_shards(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [root / name for name in sorted(set(weight_map.values()))]
    if (root / "model.safetensors").is_file():
        return [root / "model.safetensors"]
    raise PrepareError(f"{root} has no model.safetensors or model.safetensors.index.json")


def _canonical(key: str) -> str:
    """One name per weight whichever convention wrote it (`model.language_model.` or `model.`)."""
    for prefix, canon in (
        ("model.language_model.", "text:"),
        ("model.visual.", "visual:"),
        ("visual.", "visual:"),
        ("model.", "text:"),
    ):
        if key.startswith(prefix):
            return canon + key.removeprefix(prefix)
    return key


def _output_key(key: str) -> str:
    """The transformers >= 4.52 names, which transformers and vLLM both load."""
    canon = _canonical(key)
    if canon.startswith("text:"):
        return "model.language_model." + canon.removeprefix("text:")
    if canon.startswith("visual:"):
        return "model.visual." + canon.removeprefix("visual:")
    return key


def _projector_keys(base_keys: Iterable[str]) -> tuple[str, str]:
    found = {}
    for part in ("weight", "bias"):
        matches = [k for k in base_keys if k == f"{PROJECTOR}.{part}" or k.endswith(f".{PROJECTOR}.{part}")]
        if len(matches) != 1:
            raise PrepareError(f"expected one base tensor {PROJECTOR}.{part}, found {matches or 'none'}")
        found[part] = matches[0]
    return found["weight"], found["bias"]


def _plan_pairs(
    adapter_file: Path,
    tasks: list[str],
    shapes: dict[str, tuple[int, ...]],
    projector_key: str,
    adapter_config: dict[str, Any],
) -> dict[str, dict[str, tuple[str, str]]]:
    """Map every LoRA pair of the wanted tasks to the base weight it adapts.

    Text and vision weights match under either key convention; the projector
    matches by name wherever the base checkpoint keeps it.
    """
    by_canonical: dict[str, str] = {}
    for key in shapes:
        if by_canonical.setdefault(_canonical(key), key) != key:
            raise PrepareError(f"base weights {by_canonical[_canonical(key)]} and {key} name the same tensor")
    halves: dict[tuple[str, str], dict[str, str]] = {}
    with safe_open(str(adapter_file), framework="pt") as f:
        adapter_shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    for key in adapter_shapes:
        match = _LORA_KEY.match(key)
        if match is None:
            raise PrepareError(f"unsupported adapter tensor {key} (only LoRA A/B weights can be merged)")
        halves.setdefault((match["task"], match["module"]), {})[match["half"]] = key

    rank = int(adapter_config["r"])
    pairs: dict[str, dict[str, tuple[str, str]]] = {task: {} for task in tasks}
    for (task, module), half in halves.items():
        if task not in pairs:
            continue
        if set(half) != {"A", "B"}:
            missing = "B" if "A" in half else "A"
            raise PrepareError(f"adapter tensor {next(iter(half.values()))} has no matching lora_{missing}")
        is_projector = module == PROJECTOR or module.endswith(f".{PROJECTOR}")
        base = projector_key if is_projector else by_canonical.get(_canonical(f"{module}.weight"))
        if base is None:
            raise PrepareError(f"LoRA pair {half['A']} matches no base weight (looked for {module}.weight)")
        a_shape, b_shape = adapter_shapes[half["A"]], adapter_shapes[half["B"]]
        if a_shape[0] != rank or b_shape[1] != rank or (b_shape[0], a_shape[1]) != shapes[base]:
            raise PrepareError(
                f"LoRA pair {half['A']} has shapes A{list(a_shape)} B{list(b_shape)}, "
                f"which do not fit rank {rank} and base weight {base} {list(shapes[base])}"
            )
        pairs[task][base] = (half["A"], half["B"])
    for task, task_pairs in pairs.items():
        if not task_pairs:
            raise PrepareError(f"the adapter holds no LoRA weights for task {task!r}")
    return pairs


def _scaling(adapter_config: dict[str, Any]) -> float:
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise PrepareError(f"adapter peft_type {adapter_config['peft_type']!r} is not LORA")
    for unsupported in ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern"):
        if adapter_config.get(unsupported):
            raise PrepareError(f"adapter_config.json sets {unsupported}, which this merge does not support")
    rank, alpha = int(adapter_config["r"]), float(adapter_config["lora_alpha"])
    return alpha / math.sqrt(rank) if adapter_config.get("use_rslora") else alpha / rank


def _special_tokens(root: Path, config: dict[str, Any]) -> tuple[dict[str, int], dict[str, str]]:
    """Ids from the config and tokenizer, and the tokenizer's strings for them."""
    tokenizer_path = root / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise PrepareError(f"{root} has no tokenizer.json")
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    ids: dict[str, int | None] = {
        "im_start": tokenizer.token_to_id("<|im_start|>"),
        "im_end": tokenizer.token_to_id("<|im_end|>"),
        "endoftext": tokenizer.token_to_id("<|endoftext|>"),
        "vision_start": config.get("vision_start_token_id"),
        "vision_end": config.get("vision_end_token_id"),
        "image_pad": config.get("image_token_id"),
    }
    missing = [name for name, token_id in ids.items() if token_id is None]
    if missing:
        raise PrepareError(f"cannot find the token id(s) {missing} in config.json/tokenizer.json")
    strings = {name: tokenizer.id_to_token(token_id) for name, token_id in ids.items()}
    unknown = [name for name, string in strings.items() if string is None]
    if unknown:
        raise PrepareError(f"config.json token id(s) {unknown} are not in the tokenizer")
    return {k: int(v) for k, v in ids.items() if v is not None}, {k: str(v) for k, v in strings.items()}


def _write_task(src: _Source, task: str, source_label: str, folder: Path) -> None:
    pairs = src.pairs[task]
    with safe_open(str(src.adapter_file), framework="pt") as adapter:
        lora = {
            base: (adapter.get_tensor(a_key).float(), adapter.get_tensor(b_key).float())
            for base, (a_key, b_key) in pairs.items()
        }

    def merged_fp32(key: str, tensor: torch.Tensor) -> torch.Tensor:
        if key not in lora:
            return tensor.float()
        a, b = lora[key]
        return tensor.float() + src.scaling * (b @ a)

    writer = ShardWriter(folder)
    weight_key, bias_key = src.projector
    projector: dict[str, torch.Tensor] = {}
    for key, tensor in stream_tensors(src.shards):
        if key == weight_key:
            projector["weight"] = merged_fp32(key, tensor)
        elif key == bias_key:
            projector["bias"] = tensor.float()
        elif PROJECTOR not in key:
            writer.add(_output_key(key), merged_fp32(key, tensor).to(tensor.dtype) if key in lora else tensor)
    writer.close()
    save_file({k: v.contiguous() for k, v in projector.items()}, str(folder / PROJECTOR_FILE))

    config = {k: v for k, v in src.config.items() if k != "auto_map"}
    config["architectures"] = ["Qwen2_5_VLForConditionalGeneration"]
    config["model_type"] = "qwen2_5_vl"
    write_json(folder / "config.json", config)
    for name in _SIDE_FILES:
        if (src.root / name).is_file():
            shutil.copy2(src.root / name, folder / name)
    (folder / CHAT_TEMPLATE_FILE).write_text(render_chat_template(src.token_strings), encoding="utf-8")
    write_json(folder / SPEC_FILE, _spec(src, task, source_label, projector["weight"].shape[0]))


def _spec(src: _Source, task: str, source_label: str, projector_dim: int) -> dict[str, Any]:
    text_config = src.config.get("text_config") or src.config
    query_prefix = "Query: "
    passage_prefix = query_prefix if task == "text-matching" else "Passage: "
    return {
        "format_version": 1,
        "task": task,
        "source": source_label,
        "prefixes": {"query": query_prefix, "passage": passage_prefix},
        "image_prompt_text": IMAGE_PROMPT_TEXT,
        "matryoshka_dims": list(src.config.get("matryoshka_dims") or [text_config["hidden_size"]]),
        "hidden_size": text_config["hidden_size"],
        "projector_dim": projector_dim,
        "max_position_embeddings": text_config["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE_FILE,
        "projector": PROJECTOR_FILE,
        "token_ids": src.token_ids,
    }


def _publish(tmp: Path, final: Path) -> Path:
    """Move a finished task directory into place, replacing an older one.

    Temporary directories and safetensors files are private to the owner;
    the published checkpoint must be readable by whoever serves it.
    """
    tmp.chmod(0o755)
    for path in tmp.iterdir():
        path.chmod(0o644)
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
        final.rename(trash / final.name)
        tmp.rename(final)
        shutil.rmtree(trash)
    else:
        tmp.rename(final)
    return final
