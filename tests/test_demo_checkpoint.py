"""The demo checkpoint has the real jina-embeddings-v4 layout, tiny CPU-safe shapes, and is reproducible."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor, AutoTokenizer

from jv4_vllm.checkpoint.demo import TASK_NAMES, build_demo_checkpoint

ADAPTED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


# The real jinaai/jina-embeddings-v4 repo as FACTS.md section 1 records it, written out here apart from the
# generator, so the demo checkpoint is checked against the repo and not against itself.
REAL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
              "adapters/adapter_config.json", "adapters/adapter_model.safetensors")
REAL_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")  # one file, or shards and their index
REAL_TEXT = {"hidden_size": 2048, "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
             "intermediate_size": 11008, "vocab_size": 151936, "max_position_embeddings": 32768}
REAL_MROPE_SECTION = [16, 24, 24]
REAL_VISION = {"depth": 32, "hidden_size": 1280, "patch_size": 14, "spatial_merge_size": 2,
               "temporal_patch_size": 2, "window_size": 112, "out_hidden_size": 2048}
REAL_JINA = {"architectures": ["JinaEmbeddingsV4Model"], "single_vector_pool_strategy": "mean",
             "multi_vector_projector_dim": 128, "matryoshka_dims": [128, 256, 512, 1024, 2048],
             "task_names": ["retrieval", "text-matching", "code"]}
REAL_TOKEN_KEYS = {"vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
                   "image_token_id": "<|image_pad|>"}
REAL_ADAPTER = {"peft_type": "LORA", "r": 32, "lora_alpha": 32}
SAME_AS_REAL = ("architectures", "single_vector_pool_strategy", "task_names")  # values, not just keys
SAME_VISION_GEOMETRY = ("patch_size", "spatial_merge_size", "temporal_patch_size", "window_size")


def _config(root: Path) -> dict:
    return json.loads((root / "config.json").read_text())


def test_the_real_repo_facts_hang_together() -> None:
    """The list above is self-consistent, so the rules below derived from it are the real repo's."""
    head_dim = REAL_TEXT["hidden_size"] // REAL_TEXT["num_attention_heads"]
    assert sum(REAL_MROPE_SECTION) == head_dim // 2
    assert REAL_VISION["out_hidden_size"] == REAL_TEXT["hidden_size"] == REAL_JINA["matryoshka_dims"][-1]
    assert REAL_JINA["matryoshka_dims"] == [REAL_TEXT["hidden_size"] >> k for k in range(4, -1, -1)]


def test_files_and_config_keys_are_those_of_the_real_repo(demo_source: Path) -> None:
    missing = [name for name in REAL_FILES if not (demo_source / name).is_file()]
    assert not missing, missing
    assert any((demo_source / name).is_file() for name in REAL_WEIGHT_FILES)
    config = _config(demo_source)
    wanted = {*REAL_TEXT, *REAL_JINA, *REAL_TOKEN_KEYS, "rope_scaling", "vision_config"}
    assert wanted - set(config) == set()
    assert set(REAL_VISION) - set(config["vision_config"]) == set()
    assert {key: config[key] for key in SAME_AS_REAL} == {key: REAL_JINA[key] for key in SAME_AS_REAL}
    assert ({key: config["vision_config"][key] for key in SAME_VISION_GEOMETRY}
            == {key: REAL_VISION[key] for key in SAME_VISION_GEOMETRY})
    # the real repo's shape rules, at the demo's size
    hidden = config["hidden_size"]
    assert config["matryoshka_dims"] == [hidden >> k for k in range(4, -1, -1)]
    assert config["vision_config"]["out_hidden_size"] == hidden
    assert len(config["rope_scaling"]["mrope_section"]) == len(REAL_MROPE_SECTION)
    adapter = json.loads((demo_source / "adapters/adapter_config.json").read_text())
    assert adapter["peft_type"] == REAL_ADAPTER["peft_type"] and {"r", "lora_alpha", "target_modules"} <= set(adapter)


def test_config_has_cpu_safe_shapes(demo_source: Path) -> None:
    config = _config(demo_source)
    hidden = config["hidden_size"]
    assert hidden == 128
    assert 0 < config["multi_vector_projector_dim"] < hidden
    head_dim = hidden // config["num_attention_heads"]
    assert head_dim == 64
    assert config["num_attention_heads"] % config["num_key_value_heads"] == 0
    assert sum(config["rope_scaling"]["mrope_section"]) == head_dim // 2


def test_token_ids_in_config_match_the_tokenizer(demo_source: Path) -> None:
    config = _config(demo_source)
    tokenizer = AutoTokenizer.from_pretrained(demo_source)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIALS}
    assert len(set(ids.values())) == len(QWEN_SPECIALS)
    assert {key: config[key] for key in REAL_TOKEN_KEYS} == {key: ids[token] for key, token in REAL_TOKEN_KEYS.items()}
    assert ids["<|video_pad|>"] == config["video_token_id"]
    assert ids["<|im_start|>"] != 151644  # test checkpoints must not share the real ids
    assert config["vocab_size"] >= len(tokenizer)
    # special tokens stay whole inside text
    encoded = tokenizer("<|im_start|>user\nQuery: hi<|im_end|>").input_ids
    assert encoded[0] == ids["<|im_start|>"] and encoded[-1] == ids["<|im_end|>"]
    assert tokenizer.decode(tokenizer("Query: hello world").input_ids) == "Query: hello world"


def test_processor_keeps_images_small_but_varied(demo_source: Path) -> None:
    from PIL import Image

    processor = AutoProcessor.from_pretrained(demo_source)
    prompt = "<|vision_start|><|image_pad|><|vision_end|>"
    grids = []
    for size in ((56, 56), (300, 120), (2000, 1500)):
        out = processor(text=[prompt], images=[Image.new("RGB", size, "red")], return_tensors="pt")
        grids.append(tuple(out["image_grid_thw"][0].tolist()))
    assert len(set(grids)) == 3
    big = grids[-1]
    assert big[1] * big[2] * 14 * 14 <= 448 * 448


def test_weights_are_random_including_norms_and_biases(demo_source: Path) -> None:
    weights = load_file(demo_source / "model.safetensors")
    assert any(k.startswith("model.language_model.layers.") for k in weights)
    assert any(k.startswith("model.visual.blocks.") for k in weights)
    assert weights["multi_vector_projector.weight"].shape == (64, 128)
    assert weights["multi_vector_projector.bias"].abs().min() > 0
    final_norm = weights["model.language_model.norm.weight"]
    assert final_norm.std() > 0.1, "a constant final norm hides un-normalised output bugs"
    assert weights["model.language_model.layers.0.self_attn.q_proj.bias"].abs().sum() > 0
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_adapters_hold_a_nonzero_pair_per_task_for_every_target(demo_source: Path) -> None:
    adapter_config = json.loads((demo_source / "adapters/adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"
    assert adapter_config["lora_alpha"] / adapter_config["r"] != 1
    lora = load_file(demo_source / "adapters/adapter_model.safetensors")
    modules = [f"model.language_model.layers.{i}.{p}" for i in range(_config(demo_source)["num_hidden_layers"])
               for p in ADAPTED] + ["multi_vector_projector"]
    expected = {f"base_model.model.{m}.lora_{half}.{task}.weight"
                for m in modules for half in "AB" for task in TASK_NAMES}
    assert set(lora) == expected
    assert all((t != 0).all() for t in lora.values())
    assert all(lora[k].shape[0] == adapter_config["r"] for k in lora if ".lora_A." in k)
    # the target regex matches the adapted modules and leaves the vision tower alone
    pattern = re.compile(adapter_config["target_modules"])
    assert all(pattern.fullmatch(m) for m in modules)
    assert not pattern.fullmatch("model.visual.blocks.0.mlp.gate_proj")


def test_deterministic_per_seed(demo_source: Path, tmp_path: Path) -> None:
    again = build_demo_checkpoint(tmp_path / "again", seed=0)
    other = build_demo_checkpoint(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "adapters/adapter_model.safetensors"):
        base, same, different = (load_file(root / name) for root in (demo_source, again, other))
        assert all(torch.equal(base[k], same[k]) for k in base)
        assert not any(torch.equal(base[k], different[k]) for k in base)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "adapters/adapter_config.json"):
        assert (demo_source / name).read_text() == (again / name).read_text()


def test_flat_key_style_holds_the_same_tensors_under_older_names(demo_source: Path, tmp_path: Path) -> None:
    flat = build_demo_checkpoint(tmp_path / "flat", seed=0, key_style="flat")
    new, old = load_file(demo_source / "model.safetensors"), load_file(flat / "model.safetensors")
    renamed = {re.sub(r"^model\.(?!language_model|visual)", "model.language_model.",
                      re.sub(r"^visual\.", "model.visual.", k)): v for k, v in old.items()}
    assert any(k.startswith("model.layers.") for k in old) and any(k.startswith("visual.") for k in old)
    assert renamed.keys() == new.keys()
    assert all(torch.equal(renamed[k], new[k]) for k in new)
    lora = load_file(flat / "adapters/adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.retrieval.weight" in lora


def test_hidden_size_2048_builds_one_layer(tmp_path: Path) -> None:
    root = build_demo_checkpoint(tmp_path / "wide", hidden_size=2048)
    config = _config(root)
    assert config["num_hidden_layers"] == 1
    assert config["num_attention_heads"] == 32
    assert config["hidden_size"] == REAL_TEXT["hidden_size"]  # real-sized hidden states on the wire
    assert config["matryoshka_dims"] == REAL_JINA["matryoshka_dims"]
    assert config["multi_vector_projector_dim"] == REAL_JINA["multi_vector_projector_dim"]
    weights = load_file(root / "model.safetensors")
    assert weights["model.language_model.layers.0.self_attn.q_proj.weight"].shape == (2048, 2048)
    assert weights["model.visual.merger.mlp.2.weight"].shape[0] == 2048


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="key_style"):
        build_demo_checkpoint(tmp_path / "a", key_style="nope")
    with pytest.raises(ValueError, match="multiple of 64"):
        build_demo_checkpoint(tmp_path / "b", hidden_size=100)
