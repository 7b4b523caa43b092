"""Late chunking: the span rule and windows (pure), then the service against the reference encoder.

Pure tests use the demo checkpoint's own byte-level BPE tokenizer (multi-byte characters split
into several tokens, punctuation and spaces tokenised as Qwen's pre-tokenizer does).
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from jv4_vllm.core.late_chunking import LateChunkPlan, plan_late_chunking, window_bounds
from jv4_vllm.errors import InvalidRequestError

PREFIX = "Query: "
MULTILINGUAL = ["Die Katze schläft auf der Fensterbank.", "猫が窓辺で眠っています。", "Кошка спит на подоконнике.",
                "The cat sleeps 😴 on the windowsill!"]


@pytest.fixture(scope="module")
def tokenizer(prepared_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(prepared_dir / "retrieval" / "tokenizer.json"))


def plan(tokenizer: Tokenizer, texts: list[str], *, max_tokens: int = 10_000, truncate: bool = False,
         overlap: int = 4) -> LateChunkPlan:
    return plan_late_chunking(tokenizer, PREFIX, texts, max_tokens=max_tokens, truncate=truncate, overlap=overlap)


def owned_text(texts: list[str], index: int) -> str:
    """The characters input ``index`` owns in the joined prompt."""
    return (PREFIX if index == 0 else " ") + texts[index]


def check_span_rule(tokenizer: Tokenizer, texts: list[str], result: LateChunkPlan) -> None:
    """Spans tile the prompt in order, and each token lies in the span of the input owning its first char."""
    joined = PREFIX + " ".join(texts)
    encoding = tokenizer.encode(joined, add_special_tokens=False)
    assert result.token_ids == encoding.ids[:len(result.token_ids)]
    owner = []
    for index in range(len(texts)):
        owner += [index] * len(owned_text(texts, index))
    assert len(owner) == len(joined)
    expected = [owner[start] for start, _ in encoding.offsets[:len(result.token_ids)]]
    got = [index for index, (start, stop) in enumerate(result.spans) for _ in range(start, stop)]
    assert got == expected
    assert result.spans[0][0] == 0 and result.spans[-1][1] == len(result.token_ids)


def test_spans_of_multilingual_inputs_decode_to_their_text(tokenizer: Tokenizer) -> None:
    result = plan(tokenizer, MULTILINGUAL)
    check_span_rule(tokenizer, MULTILINGUAL, result)
    for index, (start, stop) in enumerate(result.spans):
        assert tokenizer.decode(result.token_ids[start:stop]) == owned_text(MULTILINGUAL, index)
    # CJK and emoji are several byte-level tokens each: the spans are longer than the characters
    assert result.spans[1][1] - result.spans[1][0] > len(MULTILINGUAL[1])
    assert result.windows == [(0, len(result.token_ids), 0)]


def test_a_chunk_of_one_token(tokenizer: Tokenizer) -> None:
    texts = ["Hello world", "x", "and more text"]
    result = plan(tokenizer, texts)
    start, stop = result.spans[1]
    assert stop - start == 1
    assert tokenizer.decode(result.token_ids[start:stop]) == " x"
    check_span_rule(tokenizer, texts, result)


@pytest.mark.parametrize("texts", [
    ["Hello world.", ", and then", "!done"],
    ["ends with a dot.", "...starts with dots", "?", "(brackets) too"],
    ["one", "-two", "'three'", '"four"'],
])
def test_chunks_starting_with_punctuation(tokenizer: Tokenizer, texts: list[str]) -> None:
    """The joining space and the punctuation after it go to the later input, never to the earlier one."""
    result = plan(tokenizer, texts)
    check_span_rule(tokenizer, texts, result)
    for index, (start, stop) in enumerate(result.spans):
        assert tokenizer.decode(result.token_ids[start:stop]) == owned_text(texts, index)


def test_prefix_belongs_to_the_first_input_and_one_input_is_the_plain_prompt(tokenizer: Tokenizer) -> None:
    result = plan(tokenizer, ["just one text"])
    assert result.spans == [(0, len(result.token_ids))]
    assert result.token_ids == tokenizer.encode(PREFIX + "just one text").ids
    two = plan(tokenizer, ["a", "b"])
    assert [tokenizer.decode(two.token_ids[a:b]) for a, b in two.spans] == ["Query: a", " b"]


def test_an_input_without_tokens_of_its_own_is_named(tokenizer: Tokenizer) -> None:
    """Trailing spaces, the joining space and a blank input pre-tokenise as one run of spaces that
    starts in the earlier input (the engine refuses blank inputs before; the plan names it too)."""
    texts = ["first  ", " ", "next"]
    encoding = tokenizer.encode(PREFIX + " ".join(texts), add_special_tokens=False)
    joining = len(PREFIX) + len(texts[0])
    assert any(start < joining < stop for start, stop in encoding.offsets)  # a token crosses the joining space
    with pytest.raises(InvalidRequestError, match=r"input\[1\] has no tokens of its own") as info:
        plan(tokenizer, texts)
    assert info.value.param == "input[1]"


TEXT_ALPHABET = st.sampled_from(list("abc xyz.,!?-'\n\tÄéß猫が🐈 ") + ["Katze", "the ", " spaces  "])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(TEXT_ALPHABET, min_size=1, max_size=12).map("".join), min_size=1, max_size=6))
def test_span_rule_on_any_text(tokenizer: Tokenizer, texts: list[str]) -> None:
    try:
        result = plan(tokenizer, texts)
    except InvalidRequestError as error:  # only for an input that owns no token's first character
        index = int(error.param.removeprefix("input[").removesuffix("]"))
        encoding = tokenizer.encode(PREFIX + " ".join(texts), add_special_tokens=False)
        start = len(PREFIX) + sum(len(t) + 1 for t in texts[:index]) - 1 if index else 0
        stop = start + len(owned_text(texts, index))
        assert not any(start <= first < stop for first, _ in encoding.offsets)
        return
    check_span_rule(tokenizer, texts, result)


def test_truncate_cuts_the_joined_prompt(tokenizer: Tokenizer) -> None:
    texts = ["word " * 30, "tail words here " * 10, "never reached"]
    full = plan(tokenizer, texts)
    limit = full.spans[1][0] + 5  # five tokens into the second input
    with pytest.raises(InvalidRequestError, match=r"input\[2\] has no tokens left") as info:
        plan(tokenizer, texts, max_tokens=limit, truncate=True)
    assert info.value.param == "input[2]"
    cut = plan(tokenizer, texts[:2], max_tokens=limit, truncate=True)
    assert cut.token_ids == full.token_ids[:limit]
    assert cut.spans == [full.spans[0], (full.spans[1][0], limit)]
    assert cut.windows == [(0, limit, 0)]


def test_without_truncate_long_prompts_get_windows(tokenizer: Tokenizer) -> None:
    texts = [f"chunk number {i} says something." for i in range(40)]
    full = plan(tokenizer, texts)
    windowed = plan(tokenizer, texts, max_tokens=64, overlap=16)
    assert windowed.token_ids == full.token_ids and windowed.spans == full.spans
    assert len(windowed.windows) > 3
    check_windows(windowed.windows, len(full.token_ids), 64, 16)


def check_windows(windows: list[tuple[int, int, int]], length: int, max_tokens: int, overlap: int) -> None:
    kept = [start + r for start, stop, keep in windows for r in range(keep, stop - start)]
    assert kept == list(range(length))  # every position exactly once, in order
    assert all(0 < stop - start <= max_tokens for start, stop, _ in windows)
    assert windows[0][0] == 0 and windows[0][2] == 0
    for (_, prev_stop, _), (start, _, keep) in pairwise(windows):
        assert keep == overlap and start == prev_stop - overlap


@pytest.mark.parametrize(("length", "max_tokens", "overlap"), [
    (1, 1, 0), (10, 10, 3), (11, 10, 3), (100, 10, 0), (100, 10, 9), (1000, 512, 256), (513, 512, 256),
    (769, 512, 256), (768, 512, 256), (5000, 512, 100),
])
def test_windows_cover_every_position_once(length: int, max_tokens: int, overlap: int) -> None:
    windows = window_bounds(length, max_tokens, overlap)
    check_windows(windows, length, max_tokens, overlap)
    assert (len(windows) == 1) == (length <= max_tokens)


def test_windows_need_an_overlap_below_the_window() -> None:
    with pytest.raises(ValueError, match="overlap"):
        window_bounds(100, 10, 10)
    assert window_bounds(10, 10, 10) == [(0, 10, 0)]  # fits: no windows, no overlap needed


def test_no_texts_is_refused(tokenizer: Tokenizer) -> None:
    with pytest.raises(InvalidRequestError) as info:
        plan(tokenizer, [])
    assert info.value.param == "input"


# ---- the reference side: same tokens, same spans, same windows --------------------------------


def test_reference_side_agrees_with_the_plan(reference, tokenizer: Tokenizer) -> None:
    from jv4_vllm.oracle.late_chunking import reference_late_chunking

    texts = MULTILINGUAL + ["x", ", punctuation first"]
    ours = plan(tokenizer, texts, max_tokens=40, overlap=8)
    theirs = reference_late_chunking(reference, texts, "retrieval", "query", max_tokens=40, overlap=8)
    assert theirs.token_ids == ours.token_ids
    assert [int((theirs.owners == i).sum()) for i in range(len(texts))] == [b - a for a, b in ours.spans]
    # windows stitched on the reference equal the whole prompt in one pass, up to the missing left context
    whole = reference.token_hidden_states(ours.token_ids, "retrieval")
    assert theirs.hidden.shape == whole.shape
    np.testing.assert_allclose(theirs.hidden[:40], whole[:40], rtol=1e-4, atol=1e-4)
    assert not np.allclose(theirs.hidden[40:], whole[40:], atol=1e-3)  # later windows lost context


# ---- the service against the reference encoder (real router, real vLLM) ------------------------

LATE_PARITY = 0.9999
ROW_PARITY = 0.999
DIM = 32  # a Matryoshka size below the demo model's hidden size
DOCUMENT = ["Late chunking embeds a whole document in one pass.", "Each chunk then pools its own tokens,",
            "so a chunk that says 'it' still knows what it refers to.", "x", ", and punctuation may start a chunk.",
            *MULTILINGUAL]


def window_of(vllm_stack) -> tuple[int, int]:
    """(max tokens per pass, overlap) of the running engine's long late chunking."""
    from jv4_vllm.core.spec import load_task_spec

    spec = load_task_spec(vllm_stack.task_dir("retrieval"))
    return min(vllm_stack.vllm.max_model_len, spec.max_position_embeddings), vllm_stack.backend.late_chunking_overlap


def late_post(router_url: str, texts: list, **fields: object) -> dict:
    import httpx

    response = httpx.post(f"{router_url}/v1/embeddings", timeout=300,
                          json={"input": texts, "late_chunking": True, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def dense(payload: dict) -> np.ndarray:
    return np.array([item["embedding"] for item in payload["data"]], np.float32)


def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.mark.vllm
@pytest.mark.parametrize(("task", "role", "texts"), [
    ("retrieval.passage", "passage", DOCUMENT),
    ("text-matching", "query", MULTILINGUAL),
    ("code.query", "query", ["def add(a, b):", "return a + b", "# adds two numbers"]),
])
def test_late_chunking_matches_the_reference(router_url: str, reference, vllm_stack, parity_report,
                                             task: str, role: str, texts: list[str]) -> None:
    from jv4_vllm.oracle.late_chunking import reference_late_chunking

    max_tokens, overlap = window_of(vllm_stack)
    payload = late_post(router_url, texts, task=task)
    got = dense(payload)
    want = reference_late_chunking(reference, texts, task.split(".")[0], role, max_tokens=max_tokens,
                                   overlap=overlap)
    assert got.shape == (len(texts), reference.hidden_size)
    cosines = cos(got, want.single_vectors())
    parity_report.append(("router", f"late chunking {task}", "single", len(texts), float(cosines.min())))
    assert cosines.min() >= LATE_PARITY
    assert payload["usage"]["prompt_tokens"] == len(want.token_ids)
    # not the same as embedding each chunk alone: the test would see late chunking ignored
    import httpx

    alone = httpx.post(f"{router_url}/v1/embeddings", json={"input": texts, "task": task}, timeout=300).json()
    assert cos(got, dense(alone)).min() < 0.999


@pytest.mark.vllm
def test_late_chunking_with_dimensions_and_every_embedding_type(router_url: str, reference, vllm_stack) -> None:
    import base64

    from jv4_vllm.oracle.late_chunking import reference_late_chunking

    max_tokens, overlap = window_of(vllm_stack)
    want = reference_late_chunking(reference, DOCUMENT, "retrieval", "query", max_tokens=max_tokens,
                                   overlap=overlap).single_vectors(truncate_dim=DIM)
    floats = dense(late_post(router_url, DOCUMENT, task="retrieval.query", dimensions=DIM))
    assert floats.shape == (len(DOCUMENT), DIM) and cos(floats, want).min() >= LATE_PARITY
    b64 = late_post(router_url, DOCUMENT, task="retrieval.query", dimensions=DIM, embedding_type="base64")
    decoded = np.array([np.frombuffer(base64.b64decode(item["embedding"]), "<f4") for item in b64["data"]])
    assert np.array_equal(decoded, floats)
    bits = late_post(router_url, DOCUMENT, task="retrieval.query", dimensions=DIM, encoding_type="ubinary")
    assert np.array_equal(np.array([item["embedding"] for item in bits["data"]], np.uint8),
                          np.packbits(floats > 0, axis=-1))
    signed = late_post(router_url, DOCUMENT, task="retrieval.query", dimensions=DIM, embedding_type="binary")
    assert np.array_equal(np.array([item["embedding"] for item in signed["data"]]),
                          np.packbits(floats > 0, axis=-1).astype(np.int16) - 128)


@pytest.mark.vllm
def test_late_chunking_multivector_spans(router_url: str, reference, vllm_stack, parity_report) -> None:
    """Each input gets exactly its span's rows: the joined prompt's rows, split at the span boundaries."""
    from jv4_vllm.oracle.late_chunking import reference_late_chunking

    texts = ["Hello world.", "x", ", then punctuation", "!", "猫が好き。", "end"]
    max_tokens, overlap = window_of(vllm_stack)
    payload = late_post(router_url, texts, task="retrieval.passage", return_multivector=True)
    got = [np.array(item["embeddings"], np.float32) for item in payload["data"]]
    ref = reference_late_chunking(reference, texts, "retrieval", "passage", max_tokens=max_tokens, overlap=overlap)
    assert [m.shape[0] for m in got] == [int((ref.owners == i).sum()) for i in range(len(texts))]
    assert got[1].shape[0] == 1  # "x" after its joining space is one token
    whole = reference.encode_text([" ".join(texts)], "retrieval", "passage", return_multivector=True)[0]
    rows = cos(np.concatenate(got), whole)
    parity_report.append(("router", "late chunking multi-vector rows", "multi", len(rows), float(rows.min())))
    assert rows.min() >= ROW_PARITY


@pytest.mark.vllm
def test_late_chunking_truncate(router_url: str, reference, vllm_stack, parity_report) -> None:
    import httpx

    from jv4_vllm.oracle.late_chunking import reference_late_chunking

    max_tokens, overlap = window_of(vllm_stack)
    repeats = 40 * max(1, max_tokens // 512)  # 20 repeats are about 600 tokens: twice the window
    texts = ["A long first chunk about cats. " * 10, "The second chunk runs past the limit. " * repeats]
    payload = late_post(router_url, texts, truncate=True)
    ref = reference_late_chunking(reference, texts, "text-matching", "query", max_tokens=max_tokens,
                                  truncate=True, overlap=overlap)
    assert len(ref.token_ids) == max_tokens and payload["usage"]["prompt_tokens"] == max_tokens
    assert 0 < int((ref.owners == 1).sum()) < len(reference.text_token_ids([texts[1]])[0])  # the second is cut
    cosines = cos(dense(payload), ref.single_vectors())
    parity_report.append(("router", "late chunking truncate", "single", len(texts), float(cosines.min())))
    assert cosines.min() >= LATE_PARITY
    cut_away = httpx.post(f"{router_url}/v1/embeddings", timeout=300,
                          json={"input": [*texts, "never reached"], "late_chunking": True, "truncate": True})
    assert cut_away.status_code == 400 and cut_away.json()["error"]["param"] == "input[2]"


@pytest.mark.vllm
def test_long_late_chunking(router_url: str, reference, vllm_stack, parity_report) -> None:
    """A joined text over the deployment's maximum length: overlapping windows, the same on the reference."""
    from jv4_vllm.oracle.late_chunking import reference_late_chunking

    max_tokens, overlap = window_of(vllm_stack)
    sections = 60 * max(1, max_tokens // 512)  # 60 sections are over 1,024 tokens: over two windows of 512
    texts = [f"Section {i}: the cat number {i} sleeps on windowsill {i % 7}, dreaming of fish." for i in range(sections)]
    texts[30] = "Abschnitt 30: 猫はまだ眠っています。 Кошка спит."
    payload = late_post(router_url, texts, task="retrieval.passage")
    ref = reference_late_chunking(reference, texts, "retrieval", "passage", max_tokens=max_tokens, overlap=overlap)
    assert len(ref.token_ids) > 2 * max_tokens  # three windows or more
    cosines = cos(dense(payload), ref.single_vectors())
    parity_report.append(("router", "long late chunking", "single", len(texts), float(cosines.min())))
    assert cosines.min() >= LATE_PARITY
    # the windows matter: one pass over everything (possible on the reference only) gives other vectors
    whole = reference.token_hidden_states(ref.token_ids, "retrieval")
    one_pass = np.stack([whole[ref.owners == i].mean(axis=0) for i in range(len(texts))])
    assert cos(dense(payload), one_pass).min() < 0.9999

    multi = late_post(router_url, texts, task="retrieval.passage", return_multivector=True)
    rows = [np.array(item["embeddings"], np.float32) for item in multi["data"]]
    assert sum(m.shape[0] for m in rows) == len(ref.token_ids)
    assert [m.shape[0] for m in rows] == [int((ref.owners == i).sum()) for i in range(len(texts))]


@pytest.mark.vllm
def test_python_client_late_chunking(router_url: str, vllm_stack) -> None:
    """``encode_text(chunks, late_chunking=True)`` through the router and in-process give the router's vectors."""
    from jv4_vllm import Client

    want = dense(late_post(router_url, DOCUMENT, task="retrieval.passage", dimensions=DIM))
    with Client(router_url) as client:
        got = client.encode_text(DOCUMENT, task="retrieval", prompt_name="passage", late_chunking=True,
                                 truncate_dim=DIM, batch_size=2)
    assert got.shape == want.shape and cos(got, want).min() >= 0.9999999
    with Client.direct(vllm_stack) as direct:
        got_direct = direct.encode_text(DOCUMENT, task="retrieval", prompt_name="passage", late_chunking=True,
                                        truncate_dim=DIM)
        multi = direct.encode_text(DOCUMENT[:3], task="retrieval", prompt_name="passage", late_chunking=True,
                                   return_multivector=True)
    assert cos(got_direct, want).min() >= 0.9999999
    want_multi = late_post(router_url, DOCUMENT[:3], task="retrieval.passage", return_multivector=True)["data"]
    assert len(multi) == 3
    for got_rows, item in zip(multi, want_multi):
        assert got_rows.shape == np.array(item["embeddings"]).shape
        assert cos(got_rows, np.array(item["embeddings"])).min() >= 0.9999999
