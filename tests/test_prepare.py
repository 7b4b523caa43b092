"""prepare merges each task's LoRA exactly, writes the contract files, and fails cleanly."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

import jv4_vllm.checkpoint.prepare as prepare_module
import jv4_vllm.checkpoint.shards as shards_module
from jv4_vllm.checkpoint.demo import TASK_NAMES, build_demo_checkpoint
from jv4_vllm.checkpoint.prepare import PrepareError, prepare

IMAGE_PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>\n"
PROJECTOR_KEYS = ("multi_vector_projector.weight", "multi_vector_projector.bias")


def _load_dir(folder: Path) -> dict[str, torch.Tensor]:
    """All model tensors of a prepared task directory, through its index."""
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(set(weight_map.values())):
        tensors.update(load_file(folder / name))
    assert tensors.keys() == weight_map.keys()
    return tensors


def _lora_delta(source: Path, module: str, task: str, rslora: bool = False) -> torch.Tensor:
    """scaling * B @ A in float64, read straight from the adapter files."""
    config = json.loads((source / "adapters/adapter_config.json").read_text())
    scaling = config["lora_alpha"] / (math.sqrt(config["r"]) if rslora else config["r"])
    lora = load_file(source / "adapters/adapter_model.safetensors")
    a = lora[f"base_model.model.{module}.lora_A.{task}.weight"].double()
    b = lora[f"base_model.model.{module}.lora_B.{task}.weight"].double()
    return scaling * (b @ a)


def _copy(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


@pytest.fixture(scope="module")
def flat_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same seed-0 checkpoint written with the older key names, prepared."""
    source = build_demo_checkpoint(tmp_path_factory.mktemp("flat-source"), seed=0, key_style="flat")
    out = tmp_path_factory.mktemp("flat-prepared")
    prepare(source, out)
    return out


def test_writes_every_contract_file(demo_source: Path, prepared_dir: Path) -> None:
    source_config = json.loads((demo_source / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(demo_source)
    assert sorted(p.name for p in prepared_dir.iterdir()) == sorted(TASK_NAMES)
    for task in TASK_NAMES:
        folder = prepared_dir / task
        for name in ("model.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
                     "preprocessor_config.json", "jv4_chat_template.jinja", "multi_vector_projector.safetensors"):
            assert (folder / name).is_file(), name
        config = json.loads((folder / "config.json").read_text())
        assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
        assert config["model_type"] == "qwen2_5_vl"
        spec = json.loads((folder / "jv4.json").read_text())
        passage = "Query: " if task == "text-matching" else "Passage: "
        assert spec == {
            "format_version": 1,
            "task": task,
            "source": str(demo_source),
            "prefixes": {"query": "Query: ", "passage": passage},
            "image_prompt_text": "Describe the image.",
            "matryoshka_dims": source_config["matryoshka_dims"],
            "hidden_size": source_config["hidden_size"],
            "projector_dim": source_config["multi_vector_projector_dim"],
            "max_position_embeddings": source_config["max_position_embeddings"],
            "chat_template": "jv4_chat_template.jinja",
            "projector": "multi_vector_projector.safetensors",
            "token_ids": {
                "im_start": tokenizer.convert_tokens_to_ids("<|im_start|>"),
                "im_end": tokenizer.convert_tokens_to_ids("<|im_end|>"),
                "vision_start": source_config["vision_start_token_id"],
                "vision_end": source_config["vision_end_token_id"],
                "image_pad": source_config["image_token_id"],
                "endoftext": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            },
        }


def test_projector_is_base_plus_scaled_lora_in_fp32(demo_source: Path, prepared_dir: Path) -> None:
    base = load_file(demo_source / "model.safetensors")
    for task in TASK_NAMES:
        projector = load_file(prepared_dir / task / "multi_vector_projector.safetensors")
        assert projector.keys() == {"weight", "bias"}
        assert projector["weight"].dtype == torch.float32
        delta = _lora_delta(demo_source, "multi_vector_projector", task)
        expected = base["multi_vector_projector.weight"].double() + delta
        torch.testing.assert_close(projector["weight"].double(), expected, rtol=0, atol=1e-6)
        assert torch.equal(projector["bias"], base["multi_vector_projector.bias"])


def test_merged_weights_are_base_plus_scaled_lora(demo_source: Path, prepared_dir: Path) -> None:
    base = load_file(demo_source / "model.safetensors")
    lora_modules = {k.split(".lora_")[0].removeprefix("base_model.model.")
                    for k in load_file(demo_source / "adapters/adapter_model.safetensors")}
    merged = {task: _load_dir(prepared_dir / task) for task in TASK_NAMES}
    for task, tensors in merged.items():
        assert tensors.keys() == base.keys() - set(PROJECTOR_KEYS)
        for key, tensor in tensors.items():
            module = key.removesuffix(".weight")
            if module in lora_modules:
                expected = base[key].double() + _lora_delta(demo_source, module, task)
                torch.testing.assert_close(tensor.double(), expected, rtol=0, atol=1e-6)
            else:
                assert torch.equal(tensor, base[key]), key
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(merged["retrieval"][q], merged["code"][q])
    assert not torch.allclose(merged["retrieval"][q], merged["text-matching"][q])


def test_both_key_conventions_merge_to_the_same_weights(prepared_dir: Path, flat_prepared: Path) -> None:
    for task in TASK_NAMES:
        new, old = _load_dir(prepared_dir / task), _load_dir(flat_prepared / task)
        assert new.keys() == old.keys()
        assert all(torch.equal(new[k], old[k]) for k in new)
        assert all(torch.equal(a, b) for a, b in zip(
            load_file(prepared_dir / task / "multi_vector_projector.safetensors").values(),
            load_file(flat_prepared / task / "multi_vector_projector.safetensors").values(),
        ))


def test_use_rslora_scales_by_alpha_over_sqrt_r(demo_source: Path, tmp_path: Path) -> None:
    source = _copy(demo_source, tmp_path / "source")
    config_path = source / "adapters/adapter_config.json"
    config = json.loads(config_path.read_text())
    config["use_rslora"] = True
    config_path.write_text(json.dumps(config))
    prepare(source, tmp_path / "out", ["code"])
    projector = load_file(tmp_path / "out/code/multi_vector_projector.safetensors")["weight"].double()
    base = load_file(source / "model.safetensors")["multi_vector_projector.weight"].double()
    expected = base + _lora_delta(source, "multi_vector_projector", "code", rslora=True)
    torch.testing.assert_close(projector, expected, rtol=0, atol=1e-6)


def test_bf16_source_stays_bf16_and_is_merged_in_fp32(demo_source: Path, tmp_path: Path) -> None:
    source = _copy(demo_source, tmp_path / "source")
    base = {k: v.to(torch.bfloat16) for k, v in load_file(source / "model.safetensors").items()}
    save_file(base, source / "model.safetensors")
    prepare(source, tmp_path / "out", ["retrieval"])
    merged = _load_dir(tmp_path / "out/retrieval")
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    key = "model.language_model.layers.1.mlp.down_proj"
    lora = load_file(source / "adapters/adapter_model.safetensors")
    a = lora[f"base_model.model.{key}.lora_A.retrieval.weight"]
    b = lora[f"base_model.model.{key}.lora_B.retrieval.weight"]
    expected = (base[f"{key}.weight"].float() + 2.0 * (b @ a)).to(torch.bfloat16)
    assert torch.equal(merged[f"{key}.weight"], expected)


def test_sharded_source_gives_bounded_sharded_output(
    demo_source: Path, prepared_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _copy(demo_source, tmp_path / "source")
    tensors = load_file(source / "model.safetensors")
    (source / "model.safetensors").unlink()
    keys = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in halves.items():
        save_file({k: tensors[k] for k in part}, source / name)
    weight_map = {k: name for name, part in halves.items() for k in part}
    (source / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    monkeypatch.setattr(shards_module, "MAX_SHARD_BYTES", 1 << 20)

    prepare(source, tmp_path / "out", ["text-matching"])
    folder = tmp_path / "out/text-matching"
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) >= 3 and not (folder / "model.safetensors").exists()
    for shard in shards:
        with safe_open(folder / shard, framework="pt") as f:
            sizes = [math.prod(f.get_slice(k).get_shape()) * 4 for k in f.keys()]
        assert sum(sizes) <= (1 << 20) or len(sizes) == 1
    resharded, whole = _load_dir(folder), _load_dir(prepared_dir / "text-matching")
    assert resharded.keys() == whole.keys()
    assert all(torch.equal(resharded[k], whole[k]) for k in whole)
    _, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_transformers_loads_a_task_dir_and_the_template_renders_the_image_prompt(prepared_dir: Path) -> None:
    folder = prepared_dir / "retrieval"
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    template = (folder / "jv4_chat_template.jinja").read_text()
    image_message = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    for add_generation_prompt in (False, True):
        rendered = tokenizer.apply_chat_template(
            image_message, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert rendered == IMAGE_PROMPT
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Query: hi"}], chat_template=template, tokenize=False
    )
    assert text == "<|im_start|>user\nQuery: hi<|im_end|>\n"


def test_the_three_tasks_give_clearly_different_sane_outputs(prepared_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(prepared_dir / "retrieval")
    inputs = tokenizer(["Query: what is the capital of France?"], return_tensors="pt")
    states = {}
    for task in TASK_NAMES:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(prepared_dir / task).eval()
        with torch.no_grad():
            states[task] = model.model(**inputs).last_hidden_state[0]
        assert torch.isfinite(states[task]).all()
        norms = states[task].norm(dim=-1)
        assert norms.min() > 1 and norms.max() < 1000
        assert norms.std() > 0.01 * norms.mean(), "random final norm weights must give varied row norms"
    for a, b in (("retrieval", "text-matching"), ("retrieval", "code"), ("text-matching", "code")):
        cosine = torch.nn.functional.cosine_similarity(states[a], states[b], dim=-1)
        assert cosine.mean() < 0.98, (a, b, cosine)


def test_rerun_replaces_a_prepared_task(demo_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare(demo_source, out, ["code"])
    (out / "code" / "stale.txt").write_text("old")
    prepare(demo_source, out, ["code"])
    assert sorted(p.name for p in out.iterdir()) == ["code"]
    assert not (out / "code" / "stale.txt").exists()


def _assert_untouched(out: Path, before: list[str] | None) -> None:
    if before is None:
        assert not out.exists()
    else:
        assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.parametrize("existing_out", [False, True])
def test_unknown_task_fails_and_writes_nothing(demo_source: Path, tmp_path: Path, existing_out: bool) -> None:
    out = tmp_path / "out"
    if existing_out:
        out.mkdir()
        (out / "keep.txt").write_text("x")
    with pytest.raises(PrepareError, match="unknown task.*'retrival'"):
        prepare(demo_source, out, ["retrieval", "retrival"])
    _assert_untouched(out, ["keep.txt"] if existing_out else None)


def test_missing_adapters_folder_fails(demo_source: Path, tmp_path: Path) -> None:
    source = _copy(demo_source, tmp_path / "source")
    shutil.rmtree(source / "adapters")
    with pytest.raises(PrepareError, match="adapters"):
        prepare(source, tmp_path / "out")
    _assert_untouched(tmp_path / "out", None)


def test_non_jina_source_fails(prepared_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(PrepareError, match="not a jina-embeddings-v4 checkpoint"):
        prepare(prepared_dir / "retrieval", tmp_path / "out")
    with pytest.raises(PrepareError, match="no config.json"):
        prepare(tmp_path, tmp_path / "out")
    _assert_untouched(tmp_path / "out", None)


def test_lora_pair_without_base_weight_fails_naming_it(demo_source: Path, tmp_path: Path) -> None:
    source = _copy(demo_source, tmp_path / "source")
    path = source / "adapters/adapter_model.safetensors"
    lora = load_file(path)
    stray = "base_model.model.model.language_model.layers.7.self_attn.q_proj.lora_{}.code.weight"
    lora[stray.format("A")] = torch.ones(8, 128)
    lora[stray.format("B")] = torch.ones(128, 8)
    save_file(lora, path)
    with pytest.raises(PrepareError, match=r"layers\.7\.self_attn\.q_proj\.lora_A\.code\.weight matches no base"):
        prepare(source, tmp_path / "out", ["code"])
    _assert_untouched(tmp_path / "out", None)


def test_half_a_lora_pair_fails(demo_source: Path, tmp_path: Path) -> None:
    source = _copy(demo_source, tmp_path / "source")
    path = source / "adapters/adapter_model.safetensors"
    lora = load_file(path)
    del lora["base_model.model.model.language_model.layers.0.mlp.up_proj.lora_B.retrieval.weight"]
    save_file(lora, path)
    with pytest.raises(PrepareError, match=r"up_proj\.lora_A\.retrieval\.weight has no matching lora_B"):
        prepare(source, tmp_path / "out")
    _assert_untouched(tmp_path / "out", None)


def test_failure_while_writing_keeps_earlier_output(
    demo_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    prepare(demo_source, out, ["retrieval"])
    before = (out / "retrieval" / "model.safetensors").read_bytes()

    def broken(tokens: dict[str, str]) -> str:
        raise OSError("disk full")

    monkeypatch.setattr(prepare_module, "render_chat_template", broken)
    with pytest.raises(OSError, match="disk full"):
        prepare(demo_source, out)
    _assert_untouched(out, ["retrieval"])
    assert (out / "retrieval" / "model.safetensors").read_bytes() == before
