"""A tiny random checkpoint laid out like the real jinaai/jina-embeddings-v4 repo.

Tests and demos need the whole pipeline (prepare, vLLM, the reference encoder)
to run in seconds on a CPU, so this writes the same files as the real repo:
a flat Qwen2.5-VL config with the jina fields, base weights including the
multi-vector projector, one PEFT adapter folder holding a LoRA pair per task,
a byte-level BPE tokenizer with the Qwen special tokens and an image
preprocessor config. Every tensor is random (norm weights and biases too, so
bugs that only show with non-trivial norms are not hidden) and deterministic
per seed; the values do not depend on the key convention, so both conventions
must merge to the same weights.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer

from jv4_vllm.checkpoint.shards import write_json
from jv4_vllm.core.types import TASK_NAMES

__all__ = ["build_demo_checkpoint", "KEY_STYLES", "TASK_NAMES"]

KEY_STYLES = ("language_model", "flat")

HEAD_DIM = 64
LORA_R = 8
LORA_ALPHA = 16
BPE_VOCAB_SIZE = 1000
MIN_PIXELS = 56 * 56
MAX_PIXELS = 448 * 448
PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
VISION_HIDDEN = 128
VISION_HEADS = 2
VISION_INTERMEDIATE = 256
VISION_DEPTH = 2

# Qwen2.5-VL's added tokens, in the order the real tokenizer appends them:
# special ones (skipped when decoding), then plain added ones.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
QWEN_PLAIN_ADDED_TOKENS = (
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip

# The Linear layers of each text decoder layer that carry a LoRA pair.
_ADAPTED = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)  # fmt: skip

# Qwen2's pre-tokenisation regex (splits words, single digits, punctuation runs, newlines).
_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# A little text to learn merges from: enough for common English words, the
# prompt prefixes and some code, so prompts tokenise to a realistic length.
_CORPUS = """
Query: what is the capital of France? Passage: Paris is the capital and largest city of France.
Describe the image. The image shows a red square on a white background with a blue circle.
A quick brown fox jumps over the lazy dog. The weather today is sunny with a light breeze.
Embeddings map text and images into one vector space, so similar things end up close together.
Retrieval finds the passages that answer a query; text matching compares two sentences; code search
finds functions from a description. Documents, tables, charts and screenshots are images too.
def add(a, b):
    return a + b
for i in range(10):
    print(i * 2)
class Point:
    def __init__(self, x: float, y: float) -> None:
        self.x = x
        self.y = y
import numpy as np
x = np.zeros((3, 4), dtype=np.float32)
SELECT name, price FROM products WHERE price > 100 ORDER BY price DESC;
function greet(name) { return "Hello, " + name + "!"; }
Numbers like 0 1 2 3 4 5 6 7 8 9 and 2025, 3.14, 42% appear in text.
Wie geht es dir? Ça va bien, merci. ¿Dónde está la biblioteca? 日本語のテキストも少しあります。
"""

_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in part -%}{{ part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def build_demo_checkpoint(
    out: Path,
    seed: int = 0,
    hidden_size: int = 128,
    key_style: str = "language_model",
) -> Path:
    """Write a tiny random jina-embeddings-v4 checkpoint to `out` and return `out`.

    `key_style` picks the base weight naming: "language_model" for
    `model.language_model.layers...`/`model.visual...` (transformers >= 4.52),
    "flat" for the older `model.layers...`/`visual...`. LoRA module paths follow
    the same convention.
    """
    if key_style not in KEY_STYLES:
        raise ValueError(f"key_style must be one of {KEY_STYLES}, got {key_style!r}")
    if hidden_size % HEAD_DIM or hidden_size < 2 * HEAD_DIM:
        raise ValueError(f"hidden_size must be a multiple of {HEAD_DIM} and at least {2 * HEAD_DIM}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _build_tokenizer()
    token_ids = {content: tokenizer.token_to_id(content) for content in QWEN_SPECIAL_TOKENS}
    config = _config(hidden_size, tokenizer.get_vocab_size(), token_ids)

    generator = torch.Generator().manual_seed(seed)
    weights = _base_weights(config, generator)
    lora = _lora_weights(config, weights, generator)

    save_file(_rename(weights, key_style), str(out / "model.safetensors"), metadata={"format": "pt"})
    write_json(out / "config.json", config)
    _write_adapters(out / "adapters", lora, key_style)
    tokenizer.save(str(out / "tokenizer.json"))
    write_json(out / "tokenizer_config.json", _tokenizer_config())
    write_json(out / "preprocessor_config.json", _preprocessor_config())
    return out


def _build_tokenizer() -> Tokenizer:
    """Train a small byte-level BPE offline, then append the Qwen added tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    tokenizer.add_tokens(
        [AddedToken(content, special=True, normalized=False) for content in QWEN_SPECIAL_TOKENS]
        + [AddedToken(content, special=False, normalized=False) for content in QWEN_PLAIN_ADDED_TOKENS]
    )
    return tokenizer


def _config(hidden_size: int, n_tokens: int, token_ids: dict[str, int]) -> dict[str, Any]:
    """Flat Qwen2.5-VL config plus the jina fields, as in the real repo."""
    heads = hidden_size // HEAD_DIM
    kv_heads = 1 if heads <= 2 else 2
    top = int(math.log2(hidden_size))
    return {
        "architectures": ["JinaEmbeddingsV4Model"],
        "model_type": "qwen2_5_vl",
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": 1 if hidden_size >= 2048 else 2,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": 70,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "use_cache": False,
        "vocab_size": -(-n_tokens // 64) * 64,
        "bos_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": token_ids["<|im_end|>"],
        "vision_start_token_id": token_ids["<|vision_start|>"],
        "vision_end_token_id": token_ids["<|vision_end|>"],
        "vision_token_id": token_ids["<|vision_pad|>"],
        "image_token_id": token_ids["<|image_pad|>"],
        "video_token_id": token_ids["<|video_pad|>"],
        "torch_dtype": "float32",
        "vision_config": {
            "depth": VISION_DEPTH,
            "hidden_size": VISION_HIDDEN,
            "intermediate_size": VISION_INTERMEDIATE,
            "num_heads": VISION_HEADS,
            "hidden_act": "silu",
            "in_channels": 3,
            "out_hidden_size": hidden_size,
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": MERGE_SIZE,
            "temporal_patch_size": TEMPORAL_PATCH_SIZE,
            "window_size": 112,
            "fullatt_block_indexes": [VISION_DEPTH - 1],
            "tokens_per_second": 2,
        },
        "single_vector_pool_strategy": "mean",
        "multi_vector_projector_dim": min(128, hidden_size // 2),
        "matryoshka_dims": [2**k for k in range(top - 4, top + 1)],
        "task_names": list(TASK_NAMES),
    }


def _base_weights(config: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random base weights under canonical names (`text.`, `visual.`, `multi_vector_projector.`)."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    q_dim = config["num_attention_heads"] * HEAD_DIM
    kv_dim = config["num_key_value_heads"] * HEAD_DIM
    vh, vi = VISION_HIDDEN, VISION_INTERMEDIATE
    merged = vh * MERGE_SIZE**2
    weights: dict[str, torch.Tensor] = {}

    def linear(name: str, out_dim: int, in_dim: int, bias: bool) -> None:
        weights[f"{name}.weight"] = torch.randn(out_dim, in_dim, generator=generator) / math.sqrt(in_dim)
        if bias:
            weights[f"{name}.bias"] = 0.1 * torch.randn(out_dim, generator=generator)

    def norm(name: str, dim: int) -> None:
        weights[f"{name}.weight"] = 1.0 + 0.3 * torch.randn(dim, generator=generator)

    weights["text.embed_tokens.weight"] = torch.randn(config["vocab_size"], h, generator=generator)
    for i in range(config["num_hidden_layers"]):
        layer = f"text.layers.{i}"
        norm(f"{layer}.input_layernorm", h)
        linear(f"{layer}.self_attn.q_proj", q_dim, h, bias=True)
        linear(f"{layer}.self_attn.k_proj", kv_dim, h, bias=True)
        linear(f"{layer}.self_attn.v_proj", kv_dim, h, bias=True)
        linear(f"{layer}.self_attn.o_proj", h, q_dim, bias=False)
        norm(f"{layer}.post_attention_layernorm", h)
        linear(f"{layer}.mlp.gate_proj", inter, h, bias=False)
        linear(f"{layer}.mlp.up_proj", inter, h, bias=False)
        linear(f"{layer}.mlp.down_proj", h, inter, bias=False)
    norm("text.norm", h)

    patch_in = 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE**2
    weights["visual.patch_embed.proj.weight"] = torch.randn(
        vh, 3, TEMPORAL_PATCH_SIZE, PATCH_SIZE, PATCH_SIZE, generator=generator
    ) / math.sqrt(patch_in)
    for i in range(VISION_DEPTH):
        block = f"visual.blocks.{i}"
        norm(f"{block}.norm1", vh)
        linear(f"{block}.attn.qkv", 3 * vh, vh, bias=True)
        linear(f"{block}.attn.proj", vh, vh, bias=True)
        norm(f"{block}.norm2", vh)
        linear(f"{block}.mlp.gate_proj", vi, vh, bias=True)
        linear(f"{block}.mlp.up_proj", vi, vh, bias=True)
        linear(f"{block}.mlp.down_proj", vh, vi, bias=True)
    norm("visual.merger.ln_q", vh)
    linear("visual.merger.mlp.0", merged, merged, bias=True)
    linear("visual.merger.mlp.2", h, merged, bias=True)

    linear("multi_vector_projector", config["multi_vector_projector_dim"], h, bias=True)
    return weights


def _lora_weights(
    config: dict[str, Any], weights: dict[str, torch.Tensor], generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """One non-zero LoRA pair per task for every adapted Linear, under canonical module paths.

    The magnitudes make scaling * B @ A about 0.4x the base weight's scale:
    large enough that every task gives clearly different outputs, small
    enough that the outputs stay sane.
    """
    modules = [f"text.layers.{i}.{proj}" for i in range(config["num_hidden_layers"]) for proj in _ADAPTED]
    modules.append("multi_vector_projector")
    lora: dict[str, torch.Tensor] = {}
    for task in TASK_NAMES:
        for module in modules:
            out_dim, in_dim = weights[f"{module}.weight"].shape
            lora[f"{module}.lora_A.{task}.weight"] = torch.randn(LORA_R, in_dim, generator=generator) / math.sqrt(
                in_dim
            )
            lora[f"{module}.lora_B.{task}.weight"] = (
                0.2 * torch.randn(out_dim, LORA_R, generator=generator) / math.sqrt(LORA_R)
            )
    return lora


def _rename(tensors: dict[str, torch.Tensor], key_style: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """Map canonical names to one of the two real key conventions."""
    new_names = key_style == "language_model"
    text, visual = ("model.language_model.", "model.visual.") if new_names else ("model.", "visual.")
    renamed = {}
    for name, tensor in tensors.items():
        if name.startswith("text."):
            name = text + name.removeprefix("text.")
        elif name.startswith("visual."):
            name = visual + name.removeprefix("visual.")
        renamed[prefix + name] = tensor.contiguous()
    return renamed


def _write_adapters(folder: Path, lora: dict[str, torch.Tensor], key_style: str) -> None:
    folder.mkdir(exist_ok=True)
    text = r"model\.language_model" if key_style == "language_model" else "model"
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "FEATURE_EXTRACTION",
        "r": LORA_R,
        "lora_alpha": LORA_ALPHA,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "target_modules": (
            rf"(^{text}\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"
            r"|^multi_vector_projector$)"
        ),
        "base_model_name_or_path": None,
    }
    write_json(folder / "adapter_config.json", adapter_config)
    save_file(
        _rename(lora, key_style, prefix="base_model.model."),
        str(folder / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )


def _tokenizer_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "processor_class": "Qwen2_5_VLProcessor",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "model_max_length": 32768,
        "extra_special_tokens": {
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
        "chat_template": _CHAT_TEMPLATE,
    }


def _preprocessor_config() -> dict[str, Any]:
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": MIN_PIXELS,
        "max_pixels": MAX_PIXELS,
        "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        "patch_size": PATCH_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "merge_size": MERGE_SIZE,
    }
