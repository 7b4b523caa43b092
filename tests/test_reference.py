"""The reference encoder, and the merge it exists to check.

The reference applies each task's LoRA on the fly over the unmerged source; the
prepared checkpoints have it merged into the weights. Both must give the same
last hidden states (and the same projected multi-vectors) token for token.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

from jv4_vllm.checkpoint.demo import TASK_NAMES, build_demo_checkpoint
from jv4_vllm.oracle.reference import ReferenceEncoder

TEXTS = ["A quick brown fox jumps over the lazy dog.", "def add(a, b): return a + b", "Paris"]
IMAGE_PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>\n"
MERGE_COSINE = 0.99999


def _image(seed: int, height: int, width: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


IMAGES = [_image(1, 64, 96), _image(2, 120, 60)]


def _row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def source_config(demo_source: Path) -> dict:
    return json.loads((demo_source / "config.json").read_text())


class _Merged:
    """A prepared task checkpoint run by plain transformers, prompts built from the spec."""

    def __init__(self, task_dir: Path) -> None:
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(task_dir, dtype=torch.float32).eval()
        self.processor = Qwen2_5_VLProcessor.from_pretrained(task_dir)
        projector = load_file(str(task_dir / "multi_vector_projector.safetensors"))
        self.projector_weight = projector["weight"].numpy()
        self.projector_bias = projector["bias"].numpy()

    @torch.inference_mode()
    def _run(self, inputs: dict) -> tuple[list[int], np.ndarray]:
        hidden = self.model.model(**inputs, use_cache=False).last_hidden_state[0]
        return inputs["input_ids"][0].tolist(), hidden.float().numpy()

    def text(self, prompt: str) -> tuple[list[int], np.ndarray]:
        return self._run(self.processor.tokenizer([prompt], return_tensors="pt"))

    def image(self, image: Image.Image) -> tuple[list[int], np.ndarray]:
        return self._run(self.processor(text=[IMAGE_PROMPT], images=[image], return_tensors="pt"))

    def multivector(self, hidden: np.ndarray) -> np.ndarray:
        return _l2(hidden @ self.projector_weight.T + self.projector_bias)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_merged_checkpoint_matches_on_the_fly_lora(
    task: str, reference: ReferenceEncoder, prepared_dir: Path
) -> None:
    merged = _Merged(prepared_dir / task)
    other_task = next(t for t in TASK_NAMES if t != task)
    role, prefix = "query", "Query: "  # the same prompt for every task, so tasks compare token for token

    ref_ids = reference.text_token_ids(TEXTS, task, role)
    ref_hidden = reference.text_hidden_states(TEXTS, task, role)
    ref_multi = reference.encode_text(TEXTS, task, role, return_multivector=True)
    other_hidden = reference.text_hidden_states(TEXTS, other_task, role)
    for text, ids, hidden, multi, other in zip(TEXTS, ref_ids, ref_hidden, ref_multi, other_hidden):
        merged_ids, merged_hidden = merged.text(prefix + text)
        assert merged_ids == ids
        assert hidden.shape == merged_hidden.shape == (len(ids), reference.hidden_size)
        assert _row_cosine(hidden, merged_hidden).min() >= MERGE_COSINE
        assert _row_cosine(multi, merged.multivector(merged_hidden)).min() >= MERGE_COSINE
        # The comparison can tell adapters apart, so a merge of the wrong (or no) task fails it.
        assert _row_cosine(other, merged_hidden).min() < 0.999

    ref_ids = reference.image_token_ids(IMAGES[:1], task)[0]
    ref_hidden = reference.image_hidden_states(IMAGES[:1], task)[0]
    ref_multi = reference.encode_image(IMAGES[:1], task, return_multivector=True)[0]
    merged_ids, merged_hidden = merged.image(IMAGES[0])
    assert merged_ids == ref_ids
    assert ref_hidden.shape == merged_hidden.shape
    assert _row_cosine(ref_hidden, merged_hidden).min() >= MERGE_COSINE
    assert _row_cosine(ref_multi, merged.multivector(merged_hidden)).min() >= MERGE_COSINE
    other = reference.image_hidden_states(IMAGES[:1], other_task)[0]
    assert _row_cosine(other, merged_hidden).min() < 0.999


def test_both_base_key_conventions_give_the_same_model(reference: ReferenceEncoder, tmp_path: Path) -> None:
    flat = ReferenceEncoder(build_demo_checkpoint(tmp_path / "flat", seed=0, key_style="flat"))
    for task in TASK_NAMES:
        np.testing.assert_allclose(flat.encode_text(TEXTS, task), reference.encode_text(TEXTS, task), atol=1e-6)
    np.testing.assert_allclose(flat.encode_image(IMAGES), reference.encode_image(IMAGES), atol=1e-6)


def test_lora_pair_matching_no_layer_is_an_error(demo_source: Path, tmp_path: Path) -> None:
    source = shutil.copytree(demo_source, tmp_path / "broken")
    adapter_file = source / "adapters" / "adapter_model.safetensors"
    tensors = load_file(str(adapter_file))
    key = next(k for k in tensors if ".q_proj.lora_A." in k)
    for ab in ("A", "B"):
        name = key.replace("lora_A", f"lora_{ab}")
        tensors[name.replace(".q_proj.", ".qq_proj.")] = tensors.pop(name)
    save_file(tensors, str(adapter_file))
    with pytest.raises(ValueError, match="qq_proj"):
        ReferenceEncoder(source)


def test_tasks_give_different_embeddings(reference: ReferenceEncoder) -> None:
    texts = {task: reference.encode_text(TEXTS, task) for task in TASK_NAMES}
    images = {task: reference.encode_image(IMAGES, task) for task in TASK_NAMES}
    for i, a in enumerate(TASK_NAMES):
        for b in TASK_NAMES[i + 1 :]:
            assert _row_cosine(texts[a], texts[b]).max() < 0.99
            assert _row_cosine(images[a], images[b]).max() < 0.99


def test_roles_differ_for_retrieval_and_code_but_not_text_matching(reference: ReferenceEncoder) -> None:
    for task in ("retrieval", "code"):
        query = reference.encode_text(TEXTS, task, "query")
        passage = reference.encode_text(TEXTS, task, "passage")
        assert _row_cosine(query, passage).max() < 0.99
    np.testing.assert_array_equal(
        reference.encode_text(TEXTS, "text-matching", "query"),
        reference.encode_text(TEXTS, "text-matching", "passage"),
    )


def test_default_role_is_query(reference: ReferenceEncoder) -> None:
    np.testing.assert_array_equal(reference.encode_text(TEXTS), reference.encode_text(TEXTS, "retrieval", "query"))


def test_text_prompt_is_prefix_plus_text(reference: ReferenceEncoder) -> None:
    tokenizer = reference.processor.tokenizer
    for task, role, prefix in [
        ("retrieval", "query", "Query: "),
        ("retrieval", "passage", "Passage: "),
        ("code", "passage", "Passage: "),
        ("text-matching", "passage", "Query: "),
    ]:
        ids = reference.text_token_ids(TEXTS, task, role)
        assert [tokenizer.decode(i) for i in ids] == [prefix + t for t in TEXTS]


def test_image_prompt_is_the_chat_prompt_with_the_grid_expanded(
    reference: ReferenceEncoder, source_config: dict
) -> None:
    tokenizer = reference.processor.tokenizer
    pad = source_config["image_token_id"]
    for ids in reference.image_token_ids(IMAGES):
        n_pads = ids.count(pad)
        assert n_pads > 1
        first = ids.index(pad)
        assert ids[first : first + n_pads] == [pad] * n_pads
        collapsed = ids[: first + 1] + ids[first + n_pads :]
        assert tokenizer.decode(collapsed) == IMAGE_PROMPT


def test_text_vector_is_normalised_mean_of_all_tokens(reference: ReferenceEncoder) -> None:
    vectors = reference.encode_text(TEXTS, "code", "passage")
    hidden = reference.text_hidden_states(TEXTS, "code", "passage")
    assert vectors.dtype == np.float32 and vectors.shape == (len(TEXTS), reference.hidden_size)
    expected = _l2(np.stack([h.mean(axis=0) for h in hidden]))
    np.testing.assert_allclose(vectors, expected, atol=1e-6)


def test_image_vector_is_normalised_mean_of_the_vision_span(
    reference: ReferenceEncoder, source_config: dict
) -> None:
    vectors = reference.encode_image(IMAGES, "retrieval")
    expected = []
    for ids, hidden in zip(reference.image_token_ids(IMAGES), reference.image_hidden_states(IMAGES)):
        start = ids.index(source_config["vision_start_token_id"])
        end = ids.index(source_config["vision_end_token_id"])
        assert 0 < start < end < len(ids) - 1  # chat tokens on both sides are left out
        expected.append(hidden[start : end + 1].mean(axis=0))
    np.testing.assert_allclose(vectors, _l2(np.stack(expected)), atol=1e-6)
    whole_prompt = _l2(np.stack([h.mean(axis=0) for h in reference.image_hidden_states(IMAGES)]))
    assert _row_cosine(vectors, whole_prompt).max() < 0.99


def test_matryoshka_truncates_then_renormalises(reference: ReferenceEncoder, source_config: dict) -> None:
    dims = source_config["matryoshka_dims"]
    assert reference.matryoshka_dims == dims
    full = reference.encode_text(TEXTS)
    hidden = reference.text_hidden_states(TEXTS)
    pooled = np.stack([h.mean(axis=0) for h in hidden])
    for dim in dims:
        vectors = reference.encode_text(TEXTS, truncate_dim=dim)
        assert vectors.shape == (len(TEXTS), dim)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
        np.testing.assert_allclose(vectors, _l2(pooled[:, :dim]), atol=1e-6)
        np.testing.assert_allclose(vectors, _l2(full[:, :dim]), atol=1e-6)
        assert reference.encode_image(IMAGES, truncate_dim=dim).shape == (len(IMAGES), dim)


def test_multivector_shapes_and_norms(reference: ReferenceEncoder, source_config: dict) -> None:
    dim = source_config["multi_vector_projector_dim"]
    text_ids = reference.text_token_ids(TEXTS)
    image_ids = reference.image_token_ids(IMAGES)
    text_multi = reference.encode_text(TEXTS, return_multivector=True)
    image_multi = reference.encode_image(IMAGES, return_multivector=True)
    for ids, rows in zip(text_ids + image_ids, text_multi + image_multi):
        assert rows.dtype == np.float32 and rows.shape == (len(ids), dim)
        np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)


def test_batching_does_not_change_results(demo_source: Path, reference: ReferenceEncoder) -> None:
    one_at_a_time = ReferenceEncoder(demo_source, batch_size=1)
    assert _row_cosine(one_at_a_time.encode_text(TEXTS), reference.encode_text(TEXTS)).min() >= MERGE_COSINE
    assert _row_cosine(one_at_a_time.encode_image(IMAGES), reference.encode_image(IMAGES)).min() >= MERGE_COSINE
    for a, b in zip(one_at_a_time.text_hidden_states(TEXTS), reference.text_hidden_states(TEXTS)):
        assert a.shape == b.shape and _row_cosine(a, b).min() >= MERGE_COSINE


def test_image_inputs_as_pil_path_or_bytes(reference: ReferenceEncoder, tmp_path: Path) -> None:
    path = tmp_path / "image.png"
    IMAGES[0].save(path)
    buffer = io.BytesIO()
    IMAGES[0].save(buffer, format="PNG")
    expected = reference.encode_image(IMAGES[:1])
    for item in (path, str(path), buffer.getvalue()):
        np.testing.assert_array_equal(reference.encode_image([item]), expected)


def test_max_length_truncates_the_prompt(reference: ReferenceEncoder) -> None:
    ids = reference.text_token_ids(TEXTS[:1], max_length=5)[0]
    assert ids == reference.text_token_ids(TEXTS[:1])[0][:5]
    assert reference.text_hidden_states(TEXTS[:1], max_length=5)[0].shape[0] == 5


def test_bad_arguments_are_errors(reference: ReferenceEncoder, source_config: dict) -> None:
    dims = source_config["matryoshka_dims"]
    with pytest.raises(ValueError, match=str(dims[0])):
        reference.encode_text(TEXTS, truncate_dim=dims[0] + 1)
    with pytest.raises(ValueError, match="truncate_dim"):
        reference.encode_text(TEXTS, truncate_dim=dims[0], return_multivector=True)
    with pytest.raises(ValueError, match="truncate_dim"):
        reference.encode_image(IMAGES, truncate_dim=dims[0], return_multivector=True)
    with pytest.raises(ValueError, match="unknown task"):
        reference.encode_text(TEXTS, task="retrieval.query")
    with pytest.raises(ValueError, match="prompt_name"):
        reference.encode_text(TEXTS, prompt_name="document")
