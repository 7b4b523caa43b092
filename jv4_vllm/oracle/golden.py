"""Expected vectors: what an encoder gives for the probe set, and golden files that keep them.

:func:`expected_vectors` runs the probes through any :class:`Oracle` (our reference
encoder, or jina-embeddings-v4's own ``encode_text``/``encode_image``); a golden file
holds the probe set and those vectors in one JSON file.

``scripts/make_golden.py`` writes one with jina-embeddings-v4's own code (or with our
reference encoder); ``jv4-vllm verify --golden FILE`` holds a running service to it without
torch or the model on the verifying machine. The file carries its inputs (texts, image
files as base64), so it means the same thing wherever it is read.

Vectors are base64 arrays: single vectors in float32; multi-vectors in float16 with at most
:data:`MAX_MULTI_ROWS` rows kept, evenly spaced and always including the first and last
(the row count is kept whole), so a 32k-token probe stays a few hundred kilobytes.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from jv4_vllm.oracle.probes import Probes

__all__ = ["FORMAT", "IMAGE_ROLE", "MAX_MULTI_ROWS", "ROLES", "Golden", "Oracle", "ReferenceOracle", "Vectors",
           "chunk_name", "expected_vectors", "open_pil", "read_golden", "sample_rows", "vectors", "write_golden"]

FORMAT = "jv4-golden/1"
MAX_MULTI_ROWS = 512
ROLES = ("query", "passage")
IMAGE_ROLE = ""  # images have no role


@dataclass(frozen=True)
class Vectors:
    """What an encoder gave for one probe of one task and role (role "" for images)."""

    task: str
    role: str
    probe: str
    single: np.ndarray  # [d] float32
    multi: np.ndarray  # [len(rows), P]: the rows listed in `rows`
    multi_rows: int  # the multi-vector's full row count (prompt tokens)
    rows: np.ndarray  # which rows `multi` holds

    @property
    def key(self) -> tuple[str, str, str]:
        return self.task, self.role, self.probe


@dataclass(frozen=True)
class Golden:
    meta: dict[str, Any]
    probes: Probes
    vectors: list[Vectors]

    @property
    def max_length(self) -> int:
        return int(self.meta["max_length"])


def sample_rows(n_rows: int, limit: int = MAX_MULTI_ROWS) -> np.ndarray:
    """Row indices kept of an ``n_rows`` multi-vector: all, or ``limit`` evenly spaced."""
    if n_rows <= limit:
        return np.arange(n_rows)
    return np.unique(np.linspace(0, n_rows - 1, limit).round().astype(np.int64))


def vectors(task: str, role: str, probe: str, single: np.ndarray, multi: np.ndarray) -> Vectors:
    """A :class:`Vectors` from a full multi-vector (rows sampled here)."""
    rows = sample_rows(multi.shape[0])
    return Vectors(task, role, probe, np.asarray(single, np.float32), np.asarray(multi[rows], np.float32),
                   int(multi.shape[0]), rows)


def _array(values: np.ndarray, dtype: str) -> dict[str, Any]:
    data = np.ascontiguousarray(values, dtype=np.dtype(dtype).newbyteorder("<"))
    return {"dtype": dtype, "shape": list(data.shape), "data": base64.b64encode(data.tobytes()).decode("ascii")}


def _unarray(raw: dict[str, Any]) -> np.ndarray:
    data = np.frombuffer(base64.b64decode(raw["data"]), dtype=np.dtype(raw["dtype"]).newbyteorder("<"))
    return data.reshape(raw["shape"]).astype(np.float32)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def write_golden(path: str | Path, meta: dict[str, Any], probes: Probes, entries: list[Vectors]) -> Path:
    """Write a golden file; ``meta`` must hold ``max_length`` (the text tokens the encoder kept)."""
    if "max_length" not in meta:
        raise ValueError("meta must say max_length: the text tokens the encoder kept")
    body = {
        "format": FORMAT,
        "meta": meta,
        "probes": {
            "texts": probes.texts,
            "truncated": sorted(probes.truncated),
            "images": {name: _b64(data) for name, data in probes.images.items()},
            "pil_images": {name: _b64(data) for name, data in probes.pil_images.items()},
            "late_chunks": probes.late_chunks,
        },
        "vectors": [
            {"task": v.task, "role": v.role, "probe": v.probe, "single": _array(v.single, "float32"),
             "multi_rows": v.multi_rows, "rows": v.rows.tolist(), "multi": _array(v.multi, "float16")}
            for v in entries
        ],
    }
    out = Path(path)
    out.write_text(json.dumps(body, ensure_ascii=False), encoding="utf-8")
    return out


def read_golden(path: str | Path) -> Golden:
    """Read a golden file; a wrong format or a broken entry is a ValueError naming it."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path}: not a golden file of format {FORMAT} (format={raw.get('format')!r})")
    p = raw["probes"]
    probes = Probes(
        texts=dict(p["texts"]), truncated=frozenset(p.get("truncated", [])),
        images={name: base64.b64decode(data) for name, data in p.get("images", {}).items()},
        pil_images={name: base64.b64decode(data) for name, data in p.get("pil_images", {}).items()},
        late_chunks={name: list(chunks) for name, chunks in p.get("late_chunks", {}).items()},
    )
    entries = []
    for position, v in enumerate(raw["vectors"]):
        try:
            entries.append(Vectors(v["task"], v["role"], v["probe"], _unarray(v["single"]), _unarray(v["multi"]),
                                   int(v["multi_rows"]), np.asarray(v["rows"], dtype=np.int64)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: vectors[{position}] is malformed ({exc})") from exc
    return Golden(meta=dict(raw["meta"]), probes=probes, vectors=entries)


# ---- the expected side: any encoder, through the same probes ---------------------------------


class Oracle(Protocol):
    """An encoder giving the expected vectors: our reference, or Jina's own model."""

    def text(self, texts: list[str], task: str, role: str, multivector: bool) -> list[np.ndarray]: ...

    def image_files(self, files: list[bytes], task: str, multivector: bool) -> list[np.ndarray]: ...

    def pil(self, images: list[Image.Image], task: str, multivector: bool) -> list[np.ndarray]: ...

    # Optional: ``late_chunks(chunks, task, role, multivector)``, one result per chunk, for
    # oracles that can late-chunk (Jina's model code cannot; the hosted API does).


def chunk_name(document: str, index: int) -> str:
    """The probe name of one chunk of a late-chunking document."""
    return f"{document}[{index}]"


def open_pil(data: bytes) -> Image.Image:
    """An image file opened as a PIL image (pixels loaded), for probes given as PIL objects."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def expected_vectors(oracle: Oracle, probes: Probes, tasks: Sequence[str]) -> list[Vectors]:
    """Every probe through ``oracle``, for every task (and both roles for texts)."""
    out: list[Vectors] = []
    names, files, pils = list(probes.texts), list(probes.images), list(probes.pil_images)
    for task in tasks:
        for role in ROLES:
            texts = [probes.texts[n] for n in names]
            singles, multis = oracle.text(texts, task, role, False), oracle.text(texts, task, role, True)
            out += [vectors(task, role, n, s, m) for n, s, m in zip(names, singles, multis)]
        if files:
            data = [probes.images[n] for n in files]
            singles, multis = oracle.image_files(data, task, False), oracle.image_files(data, task, True)
            out += [vectors(task, IMAGE_ROLE, n, s, m) for n, s, m in zip(files, singles, multis)]
        if pils:
            images = [open_pil(probes.pil_images[n]) for n in pils]
            singles, multis = oracle.pil(images, task, False), oracle.pil(images, task, True)
            out += [vectors(task, IMAGE_ROLE, n, s, m) for n, s, m in zip(pils, singles, multis)]
        late = getattr(oracle, "late_chunks", None)
        for role in ROLES if late is not None else ():
            for document, chunks in probes.late_chunks.items():
                singles, multis = late(chunks, task, role, False), late(chunks, task, role, True)
                out += [vectors(task, role, chunk_name(document, i), s, m)
                        for i, (s, m) in enumerate(zip(singles, multis))]
    return out


class ReferenceOracle:
    """Our transformers reference encoder as an :class:`Oracle`; ``white`` gives it files the
    way ``image_alpha: white`` serves them (opened, then converted as a PIL image);
    ``overlap`` is the deployment's long late-chunking overlap."""

    def __init__(self, reference: Any, white: bool = False, overlap: int = 256) -> None:
        self.reference = reference
        self.white = white
        self.overlap = overlap

    def late_chunks(self, chunks: list[str], task: str, role: str, multivector: bool) -> list[np.ndarray]:
        from jv4_vllm.oracle.late_chunking import reference_late_chunking

        late = reference_late_chunking(self.reference, chunks, task, role, max_tokens=self.reference.max_length,
                                       overlap=self.overlap)
        if not multivector:
            return list(late.single_vectors())
        return [self.reference._multivector(late.rows_of(i), task) for i in range(len(chunks))]

    def text(self, texts: list[str], task: str, role: str, multivector: bool) -> list[np.ndarray]:
        return list(self.reference.encode_text(texts, task=task, prompt_name=role, return_multivector=multivector))

    def image_files(self, files: list[bytes], task: str, multivector: bool) -> list[np.ndarray]:
        images: list[Any] = [open_pil(d) for d in files] if self.white else list(files)
        return list(self.reference.encode_image(images, task=task, return_multivector=multivector))

    def pil(self, images: list[Image.Image], task: str, multivector: bool) -> list[np.ndarray]:
        return list(self.reference.encode_image(images, task=task, return_multivector=multivector))
