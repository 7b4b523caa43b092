"""Vectors on their way to the output: decoded from answers, buffered, turned into Arrow tables.

Dense vectors become ``fixed_size_list<float32, d>``; multi-vectors
``list<fixed_size_list<float32, P>>`` (one row per token), the shape LanceDB and Qdrant take.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = ["RowBuffer", "decode_answer", "schema_for"]


def _vector(entry: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(entry["embedding"]), dtype="<f4")


def _matrix(entry: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(entry["embeddings"]), dtype="<f4").reshape(entry["shape"])


def decode_answer(payload: dict[str, Any], multivector: bool) -> list[tuple[int | None, np.ndarray, np.ndarray | None]]:
    """(page, dense, multi) per vector of a base64 answer, in input order (a PDF's pages in page order)."""
    out: list[tuple[int | None, np.ndarray, np.ndarray | None]] = []
    for item in sorted(payload["data"], key=lambda e: e["index"]):
        entries = [(page["page"], page) for page in item["pages"]] if item.get("object") == "pages" else [(None, item)]
        for page, entry in entries:
            out.append((page, _vector(entry), _matrix(entry) if multivector else None))
    return out


def schema_for(dense_dim: int, multi_dim: int | None) -> pa.Schema:
    fields = [pa.field("id", pa.string(), nullable=False), pa.field("page", pa.int32()),
              pa.field("embedding", pa.list_(pa.float32(), dense_dim))]
    if multi_dim is not None:
        fields.append(pa.field("embeddings", pa.list_(pa.list_(pa.float32(), multi_dim))))
    return pa.schema(fields)


@dataclass
class RowBuffer:
    """Rows waiting for the next row group."""

    ids: list[str] = field(default_factory=list)
    pages: list[int | None] = field(default_factory=list)
    dense: list[np.ndarray] = field(default_factory=list)
    multi: list[np.ndarray] = field(default_factory=list)
    nbytes: int = 0

    def add(self, row_id: str, page: int | None, dense: np.ndarray, multi: np.ndarray | None) -> None:
        self.ids.append(row_id)
        self.pages.append(page)
        self.dense.append(dense)
        self.nbytes += dense.nbytes
        if multi is not None:
            self.multi.append(multi)
            self.nbytes += multi.nbytes

    def __len__(self) -> int:
        return len(self.ids)

    def table(self, schema: pa.Schema) -> pa.Table:
        dense_dim = schema.field("embedding").type.list_size
        flat = np.concatenate(self.dense).astype(np.float32, copy=False)
        columns: dict[str, pa.Array] = {
            "id": pa.array(self.ids, pa.string()),
            "page": pa.array(self.pages, pa.int32()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(flat), dense_dim),
        }
        if "embeddings" in schema.names:
            multi_dim = schema.field("embeddings").type.value_type.list_size
            counts = np.array([m.shape[0] for m in self.multi], dtype=np.int32)
            offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
            rows = pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate(self.multi).reshape(-1)), multi_dim)
            columns["embeddings"] = pa.ListArray.from_arrays(pa.array(offsets), rows)
        return pa.table(columns, schema=schema)
