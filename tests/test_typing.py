"""The public client's types pass ``mypy --strict`` (tests/typing_usage.py), and misuse fails it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.timeout(600)


def _mypy(path: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    # --follow-imports=silent: the package is checked for what it exports, its own body is not the subject
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--no-error-summary",
                           "--cache-dir", str(cache), str(path)], capture_output=True, text=True, cwd=HERE.parent)


def test_the_usage_file_passes_mypy_strict(tmp_path_factory: pytest.TempPathFactory) -> None:
    pytest.importorskip("mypy")
    done = _mypy(HERE / "typing_usage.py", tmp_path_factory.getbasetemp() / "mypy-cache")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("call,says", [
    ('Client("http://x").encode_text("a", "retrieval")', "No overload variant of \"encode_text\""),
    ("Client()", 'Missing positional argument "url"'),
    ('reveal_type(Client("http://x").encode_text(["a"], return_multivector=True))', "list[numpy.ndarray"),
])
def test_misuse_fails_mypy(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, call: str, says: str) -> None:
    pytest.importorskip("mypy")
    path = tmp_path / "misuse.py"
    path.write_text(f"from jv4_vllm import Client\n{call}\n")
    done = _mypy(path, tmp_path_factory.getbasetemp() / "mypy-cache")
    assert says in done.stdout, done.stdout + done.stderr
