"""``scripts/find-python.sh``: which interpreter ``scripts/setup.sh`` builds ``.venv`` with.

Fake interpreters on an otherwise empty PATH answer the script's two probes (version, venv).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "find-python.sh"


def fake_python(folder: Path, name: str, version: str, venv: bool = True) -> Path:
    """An executable that reports ``version`` and fails the venv probe when ``venv`` is False."""
    path = folder / name
    venv_answer = "exit 0" if venv else "exit 1"
    path.write_text(f'#!/bin/sh\ncase "$2" in *ensurepip*) {venv_answer};; esac\necho "{version.replace(".", " ")}"\n')
    path.chmod(0o755)
    return path


def find(folder: Path, python: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": str(folder)} | ({"PYTHON": str(python)} if python else {})
    return subprocess.run(["/bin/bash", str(SCRIPT)], env=env, capture_output=True, text=True, check=False)


@pytest.mark.parametrize(("installed", "chosen"), [
    ({"python3.12": "3.12.4", "python3": "3.10.12"}, "python3.12"),  # Ubuntu 24.04 with an old default
    ({"python3.13": "3.13.1", "python3.12": "3.12.4", "python3.11": "3.11.9"}, "python3.13"),
    ({"python3": "3.13.5"}, "python3"),  # Debian 13: only python3
    ({"python3.14": "3.14.1", "python3": "3.11.2"}, "python3"),  # torchvision 0.28.0 refuses 3.14.1
    ({"python3.14": "3.14.2", "python3": "3.10.12"}, "python3.14"),
])
def test_picks_the_preferred_supported_interpreter(tmp_path: Path, installed: dict[str, str], chosen: str) -> None:
    for name, version in installed.items():
        fake_python(tmp_path, name, version)
    done = find(tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / chosen)


def test_skips_an_interpreter_without_venv(tmp_path: Path) -> None:
    fake_python(tmp_path, "python3.12", "3.12.4", venv=False)
    fake_python(tmp_path, "python3.11", "3.11.9")
    assert find(tmp_path).stdout.strip() == str(tmp_path / "python3.11")
    (tmp_path / "python3.11").unlink()
    done = find(tmp_path)
    assert done.returncode == 1 and "install python3.12-venv" in done.stderr


def test_none_supported_says_what_to_install(tmp_path: Path) -> None:
    fake_python(tmp_path, "python3", "3.10.12")
    fake_python(tmp_path, "python3.15", "3.15.0")  # not a candidate the build supports
    done = find(tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    assert "3.10.12 is not supported" in done.stderr and "apt-get install python3.12" in done.stderr


def test_python_variable_overrides_and_is_checked(tmp_path: Path) -> None:
    fake_python(tmp_path, "python3.13", "3.13.1")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    mine = fake_python(elsewhere, "py", "3.11.9")
    assert find(tmp_path, python=mine).stdout.strip() == str(mine)
    old = fake_python(elsewhere, "old", "3.10.12")
    done = find(tmp_path, python=old)
    assert done.returncode == 1 and f"PYTHON={old}" in done.stderr and "3.10.12" in done.stderr


def test_the_interpreter_running_the_tests_is_accepted() -> None:
    done = subprocess.run(["/bin/bash", str(SCRIPT)], env={**os.environ, "PYTHON": sys.executable},
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.strip() == sys.executable, done.stderr
