"""Unit tests of streamed pooling and token admission: the fold equals pooling the whole body at
once for any chunking and wire dtype, malformed bodies are BackendErrors, and admission is
FIFO, whole-request, and never refuses what it can eventually run."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from jv4_vllm.core.admission import CallMeter, TokenBudget
from jv4_vllm.core.folds import Projector, SpanFold, WindowSink
from jv4_vllm.core.stream import BodyFolder, parse_metadata
from jv4_vllm.core.wire import fp16_to_float32
from jv4_vllm.errors import BackendError, OverloadedError

RNG = np.random.default_rng(7)
H, P = 64, 16
WEIGHT = RNG.standard_normal((P, H)).astype(np.float32)
BIAS = RNG.standard_normal(P).astype(np.float32)


def bf16_bytes(rows: np.ndarray) -> bytes:
    return (rows.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()


def body_of(prompts: list[np.ndarray], dtype: str, gap: int = 0) -> tuple[bytes, str]:
    """A vLLM bytes answer: rows of each prompt back to back (``gap`` padding bytes between)."""
    parts, items, offset = [], [], 0
    for index, rows in enumerate(prompts):
        raw = bf16_bytes(rows) if dtype == "bfloat16" else rows.astype({"float16": "<f2", "float32": "<f4"}[dtype]).tobytes()
        items.append({"index": index, "embed_dtype": dtype, "endianness": "little", "start": offset,
                      "end": offset + len(raw), "shape": list(rows.shape)})
        pad = b"\0" * gap if index < len(prompts) - 1 else b""
        parts.append(raw + pad)
        offset += len(raw) + len(pad)
    return b"".join(parts), json.dumps({"data": items, "usage": {"prompt_tokens": 1}})


def mean_normalised(rows: np.ndarray) -> np.ndarray:
    """The reference single vector: the mean of the span in float64, L2-normalised."""
    mean = rows.astype(np.float64).mean(axis=0)
    return mean / np.linalg.norm(mean)


def projected(rows: np.ndarray) -> np.ndarray:
    """The reference multi-vector: every row through the projector, each L2-normalised."""
    out = rows.astype(np.float64) @ WEIGHT.T.astype(np.float64) + BIAS
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def wire_rows(rows: np.ndarray, dtype: str) -> np.ndarray:
    """What the wire carries, widened back: the reference the fold must match."""
    if dtype == "bfloat16":
        return (np.frombuffer(bf16_bytes(rows), "<u2").astype(np.uint32) << 16).view(np.float32).reshape(rows.shape)
    return rows.astype({"float16": np.float16, "float32": np.float32}[dtype]).astype(np.float32)


@pytest.mark.parametrize("order", ["<", ">"])
def test_fp16_widening_equals_numpys_cast_bit_for_bit(order: str) -> None:
    """Every one of the 65,536 fp16 bit patterns: finite ones by the shift-and-multiply path,
    and a slab holding inf or NaN by numpy's own cast."""
    patterns = np.arange(1 << 16, dtype=np.uint16)
    halves = patterns.view(np.float16)
    for chosen in (patterns[np.isfinite(halves)], patterns):
        wire = chosen.astype(f"{order}u2").view(f"{order}i2")
        got = fp16_to_float32(wire)
        want = chosen.view(np.float16).astype(np.float32)
        assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("chunk", [1, 7, 130, 1 << 20])
def test_folding_any_chunking_equals_pooling_the_whole_body(dtype: str, chunk: int) -> None:
    prompts = [RNG.standard_normal((n, H)).astype(np.float32) for n in (5, 1, 12)]
    body, header = body_of(prompts, dtype, gap=3)
    layouts, _ = parse_metadata(header, len(prompts))
    folds = [SpanFold([(1, n)] if n > 1 else [(0, n)], [(0, n)], Projector(WEIGHT, BIAS))
             for n in (p.shape[0] for p in prompts)]
    folder = BodyFolder(layouts, {i: WindowSink(f) for i, f in enumerate(folds)})
    for start in range(0, len(body), chunk):
        folder.take(body[start:start + chunk])
    folder.finish()
    for rows, fold in zip(prompts, folds):
        sent = wire_rows(rows, dtype)
        start = 1 if rows.shape[0] > 1 else 0
        want = mean_normalised(sent[start:])
        np.testing.assert_allclose(fold.single_vectors(None, ())[0], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(fold.multi_vectors()[0], projected(sent),
                                   rtol=1e-4, atol=1e-5)


def test_fp16_rows_fed_directly_are_summed_in_float32() -> None:
    """Rows pooled elsewhere (``Engine.pool``) may arrive as fp16: an fp16 running sum would lose
    digits over long spans."""
    rows = RNG.standard_normal((4096, H)).astype(np.float16)
    fold = SpanFold([(0, rows.shape[0])])
    WindowSink(fold).feed(0, rows)
    want = mean_normalised(rows)
    got = fold.single_vectors(None, ())[0]
    assert float(got @ want) > 1 - 1e-9


def test_windows_drop_their_overlap_and_fill_every_position() -> None:
    rows = RNG.standard_normal((10, H)).astype(np.float32)
    fold = SpanFold([(0, 4), (4, 10)], [(0, 4), (4, 10)], Projector(WEIGHT, BIAS))
    # window 1: positions 0-5; window 2: positions 3-9 with 3 rows of overlap to drop
    WindowSink(fold, offset=3, keep_from=3).feed(0, rows[3:10] + 100)  # rows 0..2 of it are context only
    fold_rows = rows.copy()
    fold_rows[6:] += 100
    WindowSink(fold, offset=0).feed(0, rows[:6])
    singles = fold.single_vectors(None, ())
    np.testing.assert_allclose(singles[0], mean_normalised(rows[:4]), rtol=1e-5)
    np.testing.assert_allclose(singles[1], mean_normalised(fold_rows[4:10]), rtol=1e-5)


@pytest.mark.parametrize("header", [None, "{not json", json.dumps({"data": [{"index": 0}]}),
                                    json.dumps({"data": [{"index": 0, "embed_dtype": "int8", "start": 0, "end": 8,
                                                          "shape": [1, 8]}]}),
                                    json.dumps({"data": [{"index": 0, "embed_dtype": "float16", "start": 0,
                                                          "end": 10, "shape": [1, 8]}]}),
                                    json.dumps({"data": []})])
def test_malformed_metadata_is_a_backend_error(header: str | None) -> None:
    with pytest.raises(BackendError):
        parse_metadata(header, 1)


def test_a_body_cut_short_or_too_long_is_a_backend_error() -> None:
    body, header = body_of([RNG.standard_normal((3, H)).astype(np.float32)], "float16")
    layouts, _ = parse_metadata(header, 1)
    short = BodyFolder(layouts, {0: WindowSink(SpanFold([(0, 3)]))})
    short.take(body[:-5])
    with pytest.raises(BackendError, match="mid-row|ended early"):
        short.finish()
    long = BodyFolder(layouts, {0: WindowSink(SpanFold([(0, 3)]))})
    with pytest.raises(BackendError, match="longer"):
        long.take(body + b"\0\0")


async def test_admission_is_fifo_whole_and_wakes_every_waiter_that_fits() -> None:
    budget = TokenBudget("t", tokens_per_replica=100, max_queue=10, replicas=lambda: 1)
    order: list[str] = []
    release = {name: asyncio.Event() for name in ("big", "a", "b", "huge")}

    async def request(name: str, cost: int) -> None:
        async with budget.admit(cost):
            order.append(name)
            await release[name].wait()

    big = asyncio.create_task(request("big", 90))
    await asyncio.sleep(0)
    a = asyncio.create_task(request("a", 40))  # waits: 90 + 40 > 100
    b = asyncio.create_task(request("b", 40))  # waits behind a (FIFO), though it is no smaller
    await asyncio.sleep(0.01)
    assert order == ["big"] and budget.waiting == 2
    release["big"].set()
    await asyncio.sleep(0.01)
    assert order == ["big", "a", "b"]  # freeing 90 tokens woke both waiters that fit
    huge = asyncio.create_task(request("huge", 1000))  # bigger than the whole budget: runs alone
    await asyncio.sleep(0.01)
    assert "huge" not in order
    release["a"].set()
    release["b"].set()
    await asyncio.sleep(0.01)
    assert order[-1] == "huge" and budget.in_flight == 100
    release["huge"].set()
    await asyncio.gather(big, a, b, huge)
    assert budget.in_flight == 0 and budget.waiting == 0


async def test_a_full_wait_queue_is_a_429_and_a_cancelled_waiter_leaves_it() -> None:
    budget = TokenBudget("t", tokens_per_replica=10, max_queue=1, replicas=lambda: 1)
    gate = asyncio.Event()

    async def hold(cost: int) -> None:
        async with budget.admit(cost):
            await gate.wait()

    first = asyncio.create_task(hold(10))
    await asyncio.sleep(0)
    second = asyncio.create_task(hold(10))
    await asyncio.sleep(0.01)
    with pytest.raises(OverloadedError):
        async with budget.admit(1):
            pass
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)
    assert budget.waiting == 0
    gate.set()
    await first
    assert budget.in_flight == 0


async def test_calls_of_one_request_stay_within_its_grant() -> None:
    meter = CallMeter(grant=10)
    active, peak, big_alone = 0, 0, []

    async def call(tokens: int) -> None:
        nonlocal active, peak
        async with meter.hold(tokens):
            active += tokens
            peak = max(peak, active if tokens <= 10 else 0)
            if tokens > 10:
                big_alone.append(active == tokens)  # a call bigger than the grant runs alone
            await asyncio.sleep(0.005)
            active -= tokens

    await asyncio.gather(*(call(4) for _ in range(6)), call(50))
    assert peak == 8  # two 4-token calls at once, never three (12 > 10)
    assert big_alone == [True]


def test_an_overlap_as_long_as_the_window_is_refused_at_start() -> None:
    from jv4_vllm.config import Config
    from jv4_vllm.core.engine import Engine

    config = Config.model_validate({"deployments": {"code": {"urls": ["http://127.0.0.1:1"]}},
                                    "vllm": {"max_model_len": 512}, "backend": {"late_chunking_overlap": 512}})
    with pytest.raises(ValueError, match="late_chunking_overlap"):
        Engine(config, {})
    Engine(config.model_copy(update={"backend": config.backend.model_copy(update={"late_chunking_overlap": 256})}), {})
