"""Bytes in and out: the number formats of vLLM ``/pooling`` rows, and our embeddings' encodings.

Router <-> vLLM traffic is ``encoding_format: bytes`` (raw little-endian fp16/bf16 body
plus a ``metadata`` JSON header; :mod:`jv4_vllm.core.stream` parses it), widened here
without per-float Python: bf16 by one integer shift, fp16 by :func:`fp16_to_float32`.
Outputs follow the OpenAI SDK (base64 = little-endian float32) and the Jina API
(binary = packed sign bits as int8, ubinary as uint8).
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np

__all__ = [
    "EmbeddingType",
    "bf16_to_float32",
    "fp16_to_float32",
    "decode_embedding_item",
    "encode_multivector",
    "encode_vector",
    "pooling_wire_fields",
]

EmbeddingType = Literal["float", "base64", "binary", "ubinary"]
WireDType = Literal["float16", "bfloat16", "float32"]

def pooling_wire_fields(dtype: WireDType) -> dict[str, str]:
    """Request fields that make vLLM answer with raw little-endian bytes."""
    return {"encoding_format": "bytes", "embed_dtype": dtype, "endianness": "little"}


def bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: widen by shifting the bits."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


_KEEP_SIGN_AND_MAGNITUDE = np.int32(-0x70000001)  # 0x8FFFFFFF
_REBIAS = np.float32(2.0 ** 112)  # float32's exponent bias (127) minus fp16's (15)
_PAST_FP16 = 65536.0  # no finite fp16 reaches this; inf and NaN land at or beyond it


def fp16_to_float32(bits: np.ndarray) -> np.ndarray:
    """fp16 bit patterns (int16, either byte order) widened to float32.

    numpy's own half-to-single cast is scalar code on x86 and was the router's largest cost
    per multi-vector passage. Here the 15 exponent and mantissa bits move to float32's
    position (a sign-extending shift puts the sign in bit 31), and one multiply by 2**112
    corrects the exponent bias and renormalises subnormals: the same values as
    ``astype(np.float32)`` for every finite fp16, at about a fifth of its CPU cost, measured.
    Inf and NaN would come out as large finite numbers, so a slab holding any goes through
    numpy's cast instead."""
    wide = np.left_shift(bits, 13, dtype=np.int32)
    np.bitwise_and(wide, _KEEP_SIGN_AND_MAGNITUDE, out=wide)
    values = wide.view(np.float32)
    np.multiply(values, _REBIAS, out=values)
    if values.size and (values.max() >= _PAST_FP16 or values.min() <= -_PAST_FP16):
        return bits.view(bits.dtype.str.replace("i", "f")).astype(np.float32)
    return values


def _packed_bits(vector: np.ndarray) -> np.ndarray:
    return np.packbits(vector > 0, axis=-1)


def encode_vector(vector: np.ndarray, embedding_type: EmbeddingType) -> list[float] | list[int] | str:
    """One single vector in the requested output encoding."""
    if embedding_type == "float":
        return vector.astype(np.float32, copy=False).tolist()
    if embedding_type == "base64":
        return base64.b64encode(vector.astype("<f4", copy=False).tobytes()).decode("ascii")
    if embedding_type == "ubinary":
        return _packed_bits(vector).tolist()
    if embedding_type == "binary":
        return (_packed_bits(vector).astype(np.int16) - 128).tolist()
    raise ValueError(f"unknown embedding type {embedding_type!r}")


def encode_multivector(matrix: np.ndarray, embedding_type: EmbeddingType) -> dict[str, Any]:
    """Fields of one multi-vector item: ``embeddings`` (and ``shape`` for base64)."""
    if embedding_type == "base64":
        data = base64.b64encode(np.ascontiguousarray(matrix, dtype="<f4").tobytes()).decode("ascii")
        return {"embeddings": data, "shape": list(matrix.shape)}
    return {"embeddings": encode_vector(matrix, embedding_type)}


def decode_embedding_item(entry: dict[str, Any]) -> np.ndarray:
    """One base64 item of our /v1/embeddings response: a vector, or a multi-vector with its shape."""
    if "embeddings" in entry:
        return np.frombuffer(base64.b64decode(entry["embeddings"]), dtype="<f4").reshape(entry["shape"])
    return np.frombuffer(base64.b64decode(entry["embedding"]), dtype="<f4")
