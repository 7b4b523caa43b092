"""Fast unit tests of the pure modules: the serving folds' pooling, wire codecs, the error tree."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import numpy as np
import pytest

from jv4_vllm.core import wire
from jv4_vllm.core.folds import Projector, SpanFold, WindowSink
from jv4_vllm.core.stream import decode_body
from jv4_vllm.errors import (
    BackendUnavailableError,
    InputTooLongError,
    InvalidRequestError,
    Jv4Error,
    OverloadedError,
    error_from_body,
)
from jv4_vllm.core.types import parse_task

RNG = np.random.default_rng(0)
TASKS = ("retrieval", "text-matching", "code")


def test_single_vector_is_the_normalised_mean_of_its_span() -> None:
    """The serving fold (core/folds.py), not a second copy of its math."""
    rows = RNG.normal(size=(10, 16)).astype(np.float16)
    fold = SpanFold([(2, 7)])
    WindowSink(fold).feed(0, rows)
    got = fold.single_vectors(None, ())[0]
    want = rows[2:7].astype(np.float64).mean(0)
    np.testing.assert_allclose(got, want / np.linalg.norm(want), rtol=1e-5, atol=1e-6)
    assert got.dtype == np.float32


def test_matryoshka_truncates_then_renormalises_and_refuses_other_dims() -> None:
    rows = RNG.normal(size=(4, 16)).astype(np.float32)
    fold = SpanFold([(0, 4)])
    WindowSink(fold).feed(0, rows)
    full = fold.single_vectors(None, ())[0]
    got = fold.single_vectors(8, (4, 8, 16))[0]
    np.testing.assert_allclose(got, full[:8] / np.linalg.norm(full[:8]), rtol=1e-6)
    with pytest.raises(ValueError, match="matryoshka"):
        fold.single_vectors(5, (4, 8, 16))


def test_multi_vector_projects_every_row_and_normalises_each() -> None:
    rows = RNG.normal(size=(5, 16)).astype(np.float32)
    weight, bias = RNG.normal(size=(4, 16)).astype(np.float32), RNG.normal(size=4).astype(np.float32)
    fold = SpanFold(multi_spans=[(0, 5)], projector=Projector(weight, bias))
    WindowSink(fold).feed(0, rows)
    got = fold.multi_vectors()[0]
    want = rows.astype(np.float64) @ weight.T + bias
    np.testing.assert_allclose(got, want / np.linalg.norm(want, axis=1, keepdims=True), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)


def _bytes_response(arrays: list[np.ndarray], dtype: str) -> tuple[bytes, str]:
    """A body and metadata header laid out as vLLM's bytes encoding does."""
    body, items, offset = b"", [], 0
    for index, array in enumerate(arrays):
        if dtype == "bfloat16":
            raw = (array.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
        else:
            raw = array.astype({"float16": "<f2", "float32": "<f4"}[dtype]).tobytes()
        items.append({"index": index, "embed_dtype": dtype, "endianness": "little",
                      "start": offset, "end": offset + len(raw), "shape": list(array.shape)})
        body, offset = body + raw, offset + len(raw)
    tokens = sum(a.shape[0] for a in arrays)
    return body, json.dumps({"data": items[::-1], "usage": {"prompt_tokens": tokens}})


@pytest.mark.parametrize("dtype,tolerance", [("float32", 0), ("float16", 1e-3), ("bfloat16", 1e-2)])
def test_decode_body_every_dtype_in_prompt_order(dtype, tolerance):
    arrays = [RNG.normal(size=(n, 8)).astype(np.float32) for n in (3, 5)]
    body, metadata = _bytes_response(arrays, dtype)
    decoded, tokens = decode_body(body, metadata)
    assert tokens == 8 and [d.shape for d in decoded] == [(3, 8), (5, 8)]
    for got, want in zip(decoded, arrays):
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=tolerance, atol=tolerance)


def test_output_encodings():
    vector = np.array([0.5, -1.0, 2.0, -0.0, 1e-3, -3.0, 0.25, 7.0, -1.0], dtype=np.float32)
    assert wire.encode_vector(vector, "float") == pytest.approx(vector.tolist())
    decoded = np.frombuffer(base64.b64decode(wire.encode_vector(vector, "base64")), "<f4")
    np.testing.assert_array_equal(decoded, vector)
    bits = np.packbits(vector > 0)
    assert wire.encode_vector(vector, "ubinary") == bits.tolist()
    assert wire.encode_vector(vector, "binary") == (bits.astype(int) - 128).tolist()
    matrix = RNG.normal(size=(3, 4)).astype(np.float32)
    packed = wire.encode_multivector(matrix, "base64")
    assert packed["shape"] == [3, 4]
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(packed["embeddings"]), "<f4").reshape(3, 4), matrix)


def test_parse_task_roles_and_errors():
    assert parse_task("retrieval.passage", TASKS) == ("retrieval", "passage")
    assert parse_task("code", TASKS) == ("code", "query")
    assert parse_task("text-matching", TASKS) == ("text-matching", "query")
    with pytest.raises(InvalidRequestError, match="unknown task") as info:
        parse_task("summarize", TASKS)
    assert info.value.param == "task"
    with pytest.raises(InvalidRequestError, match="unknown role"):
        parse_task("retrieval.document", TASKS)


@pytest.mark.parametrize("error", [
    InvalidRequestError("bad dims", param="dimensions"),
    InputTooLongError("too long", param="input[2]"),
    OverloadedError("busy", retry_after=1.0),
    BackendUnavailableError("down", retry_after=2.0),
])
def test_errors_round_trip_through_their_body(error: Jv4Error):
    back = error_from_body(error.status, error.to_body(), error.retry_after)
    assert type(back) is type(error)
    assert (back.message, back.param, back.code, back.retry_after) == (
        error.message, error.param, error.code, error.retry_after)
    assert set(error.to_body()["error"]) == {"message", "type", "param", "code"}


# Heavy or development-only modules the router and the client must never pull in.
NOT_IN_SERVING = ("torch", "transformers", "psutil", "matplotlib", "pyinstrument", "jv4_vllm.bench",
                  "jv4_vllm.checkpoint", "jv4_vllm.oracle")


@pytest.mark.parametrize("module", ["jv4_vllm.router", "jv4_vllm.client", "jv4_vllm.errors"])
def test_serving_imports_leave_out_torch_and_dev_tools(module: str) -> None:
    probe = (f"import json, sys; import {module}; "
             f"print(json.dumps({{'loaded': [m for m in {NOT_IN_SERVING!r} if m in sys.modules], "
             f"'has_module': {module!r} in sys.modules}}))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    report = json.loads(done.stdout)
    assert report == {"loaded": [], "has_module": True}, done.stderr


_ROUTER_PROCESS_PROBE = """
import ctypes, ctypes.util, json, sys
import numpy as np
from threadpoolctl import threadpool_info
if sys.argv[1] == "tuned":
    from jv4_vllm.router.process import tune_process
    tune_process()
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
before = libc.mallinfo2().hblkhd
slab = np.ones(3 << 20, dtype=np.uint8)  # a slab's widening
mapped = libc.mallinfo2().hblkhd - before
print(json.dumps({"mapped": mapped, "blas_threads": [p["num_threads"] for p in threadpool_info()
                                                     if p["user_api"] == "blas"]}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or __import__("platform").libc_ver()[0] != "glibc",
                    reason="mallopt is glibc's")
def test_the_router_process_keeps_request_sized_buffers_on_its_heap_and_runs_one_blas_thread() -> None:
    def probe(mode: str) -> dict:
        done = subprocess.run([sys.executable, "-c", _ROUTER_PROCESS_PROBE, mode], capture_output=True, text=True,
                              check=True)
        return json.loads(done.stdout)

    default, tuned = probe("default"), probe("tuned")
    assert default["mapped"] >= 3 << 20  # glibc's default: fresh pages from the kernel
    assert tuned["mapped"] == 0 and tuned["blas_threads"] == [1]
