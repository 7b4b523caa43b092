"""``jv4-vllm verify``: the running service against the reference encoder, probe by probe.

Encodes probe texts (several languages, short and long) and synthetic images (several
sizes and aspect ratios) through the service and through the reference encoder on the
UNMERGED source checkpoint, and prints a table of cosines. Exit code 1 below thresholds.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from jv4_vllm.client import AsyncClient
from jv4_vllm.config import Config

__all__ = ["PROBE_TEXTS", "ProbeResult", "probe_images", "run_probes", "verify"]

SINGLE_MIN = 0.9999
MULTI_ROW_MIN = 0.999
PROBE_TEXTS = {
    "en-short": "What is late interaction retrieval?",
    "de": "Die Katze schläft auf dem warmen Fensterbrett.",
    "zh": "向量检索把文本和图像映射到同一个空间。",
    "ar": "تعمل نماذج التضمين على تحويل النص إلى متجهات.",
    "code": "def mean(xs):\n    return sum(xs) / len(xs)",
    "en-long": " ".join(["Long documents are split into passages before they are embedded."] * 14),
}
IMAGE_SIZES = {"square-small": (56, 56), "wide": (320, 128), "tall": (96, 288), "square-448": (448, 448)}
ROLE_OF = {"retrieval": "passage", "code": "query", "text-matching": "query"}


def probe_images() -> dict[str, Image.Image]:
    """Synthetic, deterministic images: gradients with a pattern, no files needed."""
    images = {}
    for name, (width, height) in IMAGE_SIZES.items():
        y, x = np.mgrid[0:height, 0:width]
        pixels = np.stack([x * 255 // width, y * 255 // height, ((x // 8 + y // 8) % 2) * 255], axis=-1)
        images[name] = Image.fromarray(pixels.astype(np.uint8), "RGB")
    return images


@dataclass(frozen=True)
class ProbeResult:
    task: str
    probe: str
    single: float
    multi: float  # worst per-row cosine

    @property
    def ok(self) -> bool:
        return self.single >= SINGLE_MIN and self.multi >= MULTI_ROW_MIN


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = np.atleast_2d(a).astype(np.float64), np.atleast_2d(b).astype(np.float64)
    return (a64 * b64).sum(-1) / (np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1))


async def run_probes(client: AsyncClient, reference: object, tasks: list[str]) -> list[ProbeResult]:
    """Every probe through ``client`` and ``reference`` (a ReferenceEncoder) for each task."""
    texts, images = list(PROBE_TEXTS.values()), list(probe_images().values())
    names = list(PROBE_TEXTS) + [f"image:{n}" for n in IMAGE_SIZES]
    results: list[ProbeResult] = []
    for task in tasks:
        role = ROLE_OF.get(task, "query")
        got = list(await client.encode_text(texts, task=task, prompt_name=role))
        got += list(await client.encode_image(images, task=task))
        got_multi = list(await client.encode_text(texts, task=task, prompt_name=role, return_multivector=True))
        got_multi += list(await client.encode_image(images, task=task, return_multivector=True))
        want = list(reference.encode_text(texts, task=task, prompt_name=role))  # type: ignore[attr-defined]
        want += list(reference.encode_image(images, task=task))  # type: ignore[attr-defined]
        want_multi = list(reference.encode_text(texts, task=task, prompt_name=role,  # type: ignore[attr-defined]
                                                return_multivector=True))
        want_multi += list(reference.encode_image(images, task=task, return_multivector=True))  # type: ignore[attr-defined]
        for name, g, w, gm, wm in zip(names, got, want, got_multi, want_multi):
            multi = float(_cos(gm, wm).min()) if gm.shape == wm.shape else float("nan")
            results.append(ProbeResult(task, name, float(_cos(g, w)[0]), multi))
    return results


def _print_table(results: list[ProbeResult]) -> None:
    print(f"{'task':<14} {'probe':<18} {'single cos':>11} {'multi min row cos':>18}  ok")
    for r in results:
        print(f"{r.task:<14} {r.probe:<18} {r.single:>11.6f} {r.multi:>18.6f}  {'yes' if r.ok else 'NO'}")


async def _verify(config: Config, router_url: str | None) -> int:
    from jv4_vllm.oracle.reference import ReferenceEncoder  # torch: only this command needs it

    started = time.perf_counter()
    reference = ReferenceEncoder(config.source)
    client = AsyncClient(router_url, model=config.model_name) if router_url else await AsyncClient.direct(config)
    try:
        results = await run_probes(client, reference, config.tasks)
    finally:
        await client.aclose()
    _print_table(results)
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)}/{len(results)} probes within single >= {SINGLE_MIN}, "
          f"multi-vector rows >= {MULTI_ROW_MIN} ({time.perf_counter() - started:.1f} s)")
    return 1 if failed else 0


def verify(config: Config, router_url: str | None = None) -> int:
    """Run the probes; 0 when every cosine is within the thresholds."""
    return asyncio.run(_verify(config, router_url))
