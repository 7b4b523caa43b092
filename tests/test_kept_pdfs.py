"""The router's store of kept PDFs: bounded in bytes, least recently used out, one space per caller."""

from __future__ import annotations

import hashlib

import pytest

from jv4_vllm.errors import PDF_NOT_KEPT, InvalidRequestError
from jv4_vllm.router.kept_pdfs import KeptPdfs, is_reference


def ref(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_kept_files_are_bounded_per_caller_and_least_recently_used_out() -> None:
    store = KeptPdfs(max_bytes=25)
    alice, bob = KeptPdfs.caller("Bearer a"), KeptPdfs.caller("Bearer b")
    first, second, third = b"1" * 10, b"2" * 10, b"3" * 10
    store.put(alice, first)
    store.put(alice, second)
    assert store.get(alice, ref(first), 0) == first  # now the most recent
    store.put(alice, third)  # 30 bytes: the least recently used (second) goes
    assert store.get(alice, ref(third), 0) == third
    with pytest.raises(InvalidRequestError) as info:
        store.get(alice, ref(second), 4)
    assert info.value.code == PDF_NOT_KEPT and info.value.param == "input[4]"
    with pytest.raises(InvalidRequestError):
        store.get(bob, ref(first), 0)  # another caller cannot name it
    store.put(alice, b"x" * 26)  # larger than the whole store: not kept, nothing evicted
    assert store.get(alice, ref(first), 0) == first


def test_references_cannot_be_base64_data_uris_or_urls() -> None:
    assert is_reference(ref(b"pdf"))
    for value in ("sha256:" + "A" * 64, "sha256:abc", "JVBERi0xLjQK", "data:application/pdf;base64,AA",
                  "https://example.com/a.pdf"):
        assert not is_reference(value)
