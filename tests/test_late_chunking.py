"""Late chunking: the span rule and windows (pure), then the service against the reference encoder.

Pure tests use the demo checkpoint's own byte-level BPE tokenizer (multi-byte characters split
into several tokens, punctuation and spaces tokenised as Qwen's pre-tokenizer does).
"""

from __future__ import annotations

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
    for (_, prev_stop, _), (start, _, keep) in zip(windows, windows[1:]):
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
