"""Session-wide fixtures: the demo checkpoint and its prepared task directories, built once.

``JV4_TEST_STACK_DIR=DIR`` reuses a demo stack that ``python tests/vllm_stack.py DIR`` keeps
running (checkpoints and three vLLM deployments), so several test runs can share one stack
while code changes; without it every session builds and starts its own.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_STACK = os.environ.get("JV4_TEST_STACK_DIR")


@pytest.fixture(scope="session")
def demo_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random jina-embeddings-v4 checkpoint (seed 0) in the real repo's layout."""
    from jv4_vllm.checkpoint.demo import build_demo_checkpoint

    if SHARED_STACK:
        from vllm_stack import shared_paths

        return shared_paths(Path(SHARED_STACK))[0]
    return build_demo_checkpoint(tmp_path_factory.mktemp("demo-source"), seed=0)


@pytest.fixture(scope="session")
def prepared_dir(demo_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`demo_source` prepared for serving: one merged checkpoint per task in `<dir>/<task>/`."""
    from jv4_vllm.checkpoint.prepare import prepare

    if SHARED_STACK:
        from vllm_stack import shared_paths

        return shared_paths(Path(SHARED_STACK))[1]
    out = tmp_path_factory.mktemp("prepared")
    prepare(demo_source, out)
    return out


# ---- real vLLM deployments of the three tasks (started once per session) ------------------------

@pytest.fixture(scope="session")
def stack_config(demo_source: Path, prepared_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Config of the demo stack: three deployments on fresh loopback ports (not started)."""
    from vllm_stack import demo_config, shared_config

    if SHARED_STACK:
        return shared_config(Path(SHARED_STACK))
    return demo_config(demo_source, prepared_dir, tmp_path_factory.mktemp("logs"))


@pytest.fixture(scope="session")
def vllm_stack(stack_config):
    """The three task deployments running on real vLLM (CPU); yields the config that points at them."""
    from jv4_vllm.deploy.launch import stop_children
    from vllm_stack import start_all

    if SHARED_STACK:
        yield stack_config
        return
    children = start_all(stack_config)
    try:
        yield stack_config
    finally:
        stop_children(children)


@pytest.fixture(scope="session")
def reference(demo_source: Path):
    """The reference encoder on the UNMERGED demo checkpoint (LoRA applied on the fly)."""
    from jv4_vllm.oracle.reference import ReferenceEncoder

    return ReferenceEncoder(demo_source)


@pytest.fixture(scope="session")
def router_url(vllm_stack, tmp_path_factory: pytest.TempPathFactory):
    """`jv4-vllm router` as its own process, as users run it."""
    import sys

    from jv4_vllm.deploy.launch import spawn, stop_children
    from vllm_stack import wait_ready, write_config

    path = write_config(vllm_stack, tmp_path_factory.mktemp("router") / "config.yaml")
    child = spawn("router", [sys.executable, "-m", "jv4_vllm.cli", "router", "--config", str(path)], path.parent)
    url = f"http://{vllm_stack.router.host}:{vllm_stack.router.port}"
    try:
        wait_ready(url, child.process)
        yield url
    finally:
        stop_children([child])


PARITY_ROWS: list[tuple[str, str, str, int, float]] = []


@pytest.fixture(scope="session")
def parity_report() -> list[tuple[str, str, str, int, float]]:
    """Rows (path, case, kind, count, min cosine) printed at the end of the run."""
    return PARITY_ROWS


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001 - pytest hook
    if not PARITY_ROWS:
        return
    terminalreporter.section("parity with the reference encoder (min cosine)")
    for path, case, kind, count, cosine in PARITY_ROWS:
        terminalreporter.write_line(f"{path:<14} {case:<34} {kind:<8} n={count:<4} min cos {cosine:.7f}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that start a whole stack of their own run first, before the shared deployments are up:
    both at once would not fit in memory on a small machine."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("own_stack") else 1)
