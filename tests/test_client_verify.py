"""The blocking client through the router, and `jv4-vllm verify`, on real deployments."""

from __future__ import annotations

import re

import numpy as np
import pytest

from images_util import make_image, png_bytes
from jv4_vllm import Client, InvalidRequestError
from jv4_vllm.oracle.verify import verify

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]


def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_client_through_router(router_url, reference, tmp_path):
    texts = [f"document number {i} about vectors" for i in range(25)]
    image = make_image(120, 90, seed=9)
    path = tmp_path / "image.png"
    path.write_bytes(png_bytes(image))
    with Client(router_url) as client:
        got = client.encode_text(texts, task="retrieval", prompt_name="passage", batch_size=4, show_progress=True)
        assert got.shape == (25, reference.hidden_size)
        assert cos(got, reference.encode_text(texts, task="retrieval", prompt_name="passage")).min() >= 0.9999
        single = client.encode_text("just one", task="text-matching")
        assert single.ndim == 1
        vectors = client.encode_image([image, str(path), png_bytes(image)], task="code", truncate_dim=32)
        want = reference.encode_image([image], task="code", truncate_dim=32)[0]
        assert vectors.shape == (3, 32) and cos(vectors, want[None]).min() >= 0.9999
        multi = client.encode_image([image, make_image(64, 200, seed=1)], return_multivector=True)
        assert isinstance(multi, list) and [m.shape[1] for m in multi] == [reference.encode_text(["x"], return_multivector=True)[0].shape[1]] * 2
        assert multi[0].shape[0] != multi[1].shape[0]  # ragged: a list, never a stack
        with pytest.raises(InvalidRequestError, match="dimensions=3"):
            client.encode_text(["x"], truncate_dim=3)


def test_verify_passes_through_router(vllm_stack, router_url, capsys):
    assert verify(vllm_stack, router_url=router_url) == 0
    out = capsys.readouterr().out
    passed, total = map(int, re.search(r"(\d+)/(\d+) probes within", out).groups())
    assert passed == total >= 3 * (2 * 8 + 13)  # every task: both roles of every text, every image
    for probe in ("over-length", "rgba-png", "grey16-png", "exif-rotated-jpeg", "pil-rgba"):
        assert probe in out
    assert "FAIL" not in out
