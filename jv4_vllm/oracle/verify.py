"""``jv4-vllm verify``: the running service against the reference, probe by probe.

The probes (:mod:`jv4_vllm.oracle.probes`) go through the service, every task in both
roles: texts from a few tokens to the deployment's full length plus one cut by
``truncate``, documents embedded with late chunking (within one window, and windowed), image files of every kind as users upload them (sent untouched, so the
service's own image rules are what is checked), and a PIL image through the Python client.
The expected vectors come from the reference encoder on the UNMERGED source checkpoint, or
from a golden file (``--golden``, made by ``scripts/make_golden.py`` with Jina's own code).
The table names every probe that fails and by how much; the exit code is 1 if any does.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from jv4_vllm.client import AsyncClient
from jv4_vllm.config import Config
from jv4_vllm.core.spec import SPEC_FILE
from jv4_vllm.core.wire import decode_embedding_item
from jv4_vllm.errors import Jv4Error, error_from_body
from jv4_vllm.oracle.golden import (
    IMAGE_ROLE,
    ROLES,
    Golden,
    ReferenceOracle,
    Vectors,
    chunk_name,
    expected_vectors,
    open_pil,
    read_golden,
    vectors,
)
from jv4_vllm.oracle.probes import Probes, build_probes

__all__ = ["MULTI_ROW_MIN", "SINGLE_MIN", "ProbeResult", "compare", "service_max_tokens", "service_vectors",
           "verify"]

SINGLE_MIN = 0.9999
MULTI_ROW_MIN = 0.999


async def _post_files(http: httpx.AsyncClient, model: str, files: list[bytes], task: str,
                      multivector: bool) -> list[np.ndarray]:
    """Image files to the router exactly as a user uploads them (no client-side conversion)."""
    body = {"model": model, "task": task, "embedding_type": "base64", "return_multivector": multivector,
            "input": [{"image": base64.b64encode(data).decode("ascii")} for data in files]}
    response = await http.post("/v1/embeddings", json=body)
    payload: dict[str, Any] = response.json() if response.content else {}
    if response.status_code >= 400:
        raise error_from_body(response.status_code, payload, None)
    return [decode_embedding_item(e) for e in sorted(payload["data"], key=lambda e: e["index"])]


Pair = tuple[list[np.ndarray], list[np.ndarray]]  # single vectors, multi-vectors


async def _texts(client: AsyncClient, texts: list[str], task: str, role: str, cut: bool) -> Pair:
    single = await client.encode_text(texts, task=task, prompt_name=role, truncate=cut)
    multi = await client.encode_text(texts, task=task, prompt_name=role, truncate=cut, return_multivector=True)
    return list(single), list(multi)


async def _file(client: AsyncClient, http: httpx.AsyncClient | None, model: str, data: bytes, task: str) -> Pair:
    if http is None:
        return ([await client.encode_image(data, task=task)],
                [await client.encode_image(data, task=task, return_multivector=True)])
    full_task = task if task == "text-matching" else f"{task}.query"
    return (await _post_files(http, model, [data], full_task, False),
            await _post_files(http, model, [data], full_task, True))


async def _late(client: AsyncClient, chunks: list[str], task: str, role: str) -> Pair:
    single = await client.encode_text(chunks, task=task, prompt_name=role, late_chunking=True)
    multi = await client.encode_text(chunks, task=task, prompt_name=role, late_chunking=True, return_multivector=True)
    return list(single), list(multi)


async def _pil_image(client: AsyncClient, data: bytes, task: str) -> Pair:
    return ([await client.encode_image(open_pil(data), task=task)],
            [await client.encode_image(open_pil(data), task=task, return_multivector=True)])


async def service_vectors(client: AsyncClient, probes: Probes, tasks: Sequence[str],
                          http: httpx.AsyncClient | None = None,
                          model: str = "") -> tuple[list[Vectors], dict[tuple[str, str, str], str]]:
    """Every probe through the service, and the error of each probe it refused.

    Texts and PIL images go with ``client``; image files go raw to the router through
    ``http`` when given (as a user uploads them), else through ``client`` (in-process engine).
    """
    out: list[Vectors] = []
    errors: dict[tuple[str, str, str], str] = {}

    async def attempt(keys: list[tuple[str, str, str]], work: Coroutine[Any, Any, Pair]) -> None:
        try:
            singles, multis = await work
        except Jv4Error as exc:
            errors.update({key: f"the service refused it: {exc.message}" for key in keys})
            return
        out.extend(vectors(*key, s, m) for key, s, m in zip(keys, singles, multis))

    for task in tasks:
        for role in ROLES:
            for cut in (False, True):
                names = [n for n in probes.texts if (n in probes.truncated) == cut]
                if names:
                    texts = [probes.texts[n] for n in names]
                    await attempt([(task, role, n) for n in names], _texts(client, texts, task, role, cut))
        for name, data in probes.images.items():
            await attempt([(task, IMAGE_ROLE, name)], _file(client, http, model, data, task))
        for name, data in probes.pil_images.items():
            await attempt([(task, IMAGE_ROLE, name)], _pil_image(client, data, task))
        for role in ROLES:
            for document, chunks in probes.late_chunks.items():
                keys = [(task, role, chunk_name(document, i)) for i in range(len(chunks))]
                await attempt(keys, _late(client, chunks, task, role))
    return out, errors


@dataclass(frozen=True)
class ProbeResult:
    task: str
    role: str
    probe: str
    tokens: int  # rows of the multi-vector: the prompt's tokens
    single: float
    multi: float  # worst per-row cosine (NaN when the row counts differ)
    problem: str = ""  # what failed and by how much; empty when the probe passed

    @property
    def ok(self) -> bool:
        return not self.problem


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = np.atleast_2d(a).astype(np.float64), np.atleast_2d(b).astype(np.float64)
    return (a64 * b64).sum(-1) / (np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1))


def compare(got: list[Vectors], want: list[Vectors], single_min: float = SINGLE_MIN,
            multi_min: float = MULTI_ROW_MIN,
            errors: dict[tuple[str, str, str], str] | None = None) -> list[ProbeResult]:
    """One result per expected entry; a probe the service did not answer is a failure."""
    by_key = {v.key: v for v in got}
    results = []
    for w in want:
        g = by_key.get(w.key)
        if g is None:
            results.append(ProbeResult(w.task, w.role, w.probe, w.multi_rows, float("nan"), float("nan"),
                                       (errors or {}).get(w.key, "not answered by the service")))
            continue
        problems = []
        single = float("nan")
        if g.single.shape != w.single.shape:
            problems.append(f"single vector of shape {g.single.shape}, expected {w.single.shape}")
        else:
            single = float(_cos(g.single, w.single)[0])
            if not single >= single_min:
                problems.append(f"single {single:.6f} < {single_min} (short by {single_min - single:.6f})")
        multi = float("nan")
        if g.multi_rows != w.multi_rows:
            problems.append(f"{g.multi_rows} tokens, expected {w.multi_rows}")
        else:
            full = np.zeros((g.multi_rows, g.multi.shape[1]), np.float32)
            full[g.rows] = g.multi
            cosines = _cos(full[w.rows], w.multi)
            multi = float(cosines.min())
            if not multi >= multi_min:
                worst = int(w.rows[int(np.argmin(cosines))])
                problems.append(f"multi row {worst} {multi:.6f} < {multi_min} (short by {multi_min - multi:.6f})")
        results.append(ProbeResult(w.task, w.role, w.probe, w.multi_rows, single, multi, "; ".join(problems)))
    return results


def print_table(results: list[ProbeResult], single_min: float, multi_min: float) -> None:
    print(f"{'task':<14} {'role':<8} {'probe':<26} {'tokens':>6} {'single cos':>11} {'multi min row':>14}  result")
    for r in results:
        print(f"{r.task:<14} {r.role or '-':<8} {r.probe:<26} {r.tokens:>6} {r.single:>11.6f} {r.multi:>14.6f}  "
              f"{'ok' if r.ok else 'FAIL: ' + r.problem}")
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)}/{len(results)} probes within single >= {single_min}, "
          f"multi-vector rows >= {multi_min}")
    for r in failed:
        print(f"FAILED {r.task} {r.role or 'image'} {r.probe}: {r.problem}")


def service_max_tokens(config: Config) -> int:
    """The text tokens the deployments keep: min(max_model_len, max_position_embeddings)."""
    limits = [config.vllm.max_model_len]
    for task in config.tasks:
        spec = config.task_dir(task) / SPEC_FILE
        if spec.is_file():
            limits.append(int(json.loads(spec.read_text(encoding="utf-8"))["max_position_embeddings"]))
    return min(limits)


def _api_key(config: Config) -> str | None:
    """The first API key the router is configured with, if any (verify is the operator's tool)."""
    keys = os.environ.get(config.router.api_keys_env, "").split(",")
    if config.router.api_keys_file and Path(config.router.api_keys_file).is_file():
        keys += Path(config.router.api_keys_file).read_text(encoding="utf-8").splitlines()
    return next((k.strip() for k in keys if k.strip()), None)


async def _verify(config: Config, router_url: str | None, golden_path: str | Path | None,
                  single_min: float, multi_min: float) -> int:
    started = time.perf_counter()
    max_tokens = service_max_tokens(config)
    if golden_path is not None:
        golden: Golden = read_golden(golden_path)
        if golden.max_length != max_tokens:
            print(f"note: the golden file keeps {golden.max_length} text tokens, this deployment {max_tokens}: "
                  "the full-length and truncated probes cannot match; make the golden with "
                  f"--max-length {max_tokens}")
        overlap = golden.meta.get("late_chunking_overlap")
        if overlap is not None and overlap != config.backend.late_chunking_overlap:
            print(f"note: the golden file's late chunking overlaps windows by {overlap} tokens, this deployment "
                  f"by {config.backend.late_chunking_overlap}: the windowed late-chunking probe cannot match")
        probes = golden.probes
        if not any(chunk_name(doc, 0) == v.probe for v in golden.vectors for doc in probes.late_chunks):
            probes = replace(probes, late_chunks={})  # the golden's encoder could not late-chunk
        want_for = lambda tasks: [v for v in golden.vectors if v.task in tasks]
        print(f"golden file {golden_path}: {golden.meta.get('made_by', '?')}, {len(golden.vectors)} vectors")
    else:
        from jv4_vllm.oracle.reference import (
            ReferenceEncoder,  # torch: only this mode needs it
        )

        reference = ReferenceEncoder(config.source, max_length=max_tokens)
        tokenizer = reference.processor.tokenizer
        probes = build_probes(lambda text: len(tokenizer(text)["input_ids"]), max_tokens)
        oracle = ReferenceOracle(reference, white=config.limits.image_alpha == "white",
                                 overlap=config.backend.late_chunking_overlap)
        want_for = lambda tasks: expected_vectors(oracle, probes, tasks)
    key = _api_key(config)
    client = (AsyncClient(router_url, api_key=key, model=config.model_name, timeout=600) if router_url
              else await AsyncClient.direct(config))
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    http = httpx.AsyncClient(base_url=router_url.rstrip("/"), headers=headers, timeout=600) if router_url else None
    try:
        got, errors = await service_vectors(client, probes, config.tasks, http, config.model_name)
    finally:
        await client.aclose()
        if http is not None:
            await http.aclose()
    results = compare(got, want_for(config.tasks), single_min, multi_min, errors)
    print_table(results, single_min, multi_min)
    print(f"({time.perf_counter() - started:.1f} s)")
    return 0 if all(r.ok for r in results) else 1


def verify(config: Config, router_url: str | None = None, golden: str | Path | None = None,
           single_min: float = SINGLE_MIN, multi_min: float = MULTI_ROW_MIN) -> int:
    """Run the probes; 0 when every cosine is within the thresholds."""
    return asyncio.run(_verify(config, router_url, golden, single_min, multi_min))
