"""The container image's Dockerfile follows the image rules, checked without Docker: pinned bases,
the manifests' non-root user, a small router image with a health check as the default target."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from test_k8s import OVERLAYS, REPO, Rendered, _config, _containers, _pod_templates

from jv4_vllm.config import RouterConfig
from jv4_vllm.deploy.k8s import render_manifests


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]]


def _dockerfile_stages(text: str) -> list[Stage]:
    """Parse FROM/ARG/RUN/USER/... lines (continuations joined, comments dropped)."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in joined.splitlines():
        if not line.strip():
            continue
        instruction, _, rest = line.strip().partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "FROM":
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args[m.group(1)], rest.split()[0])
            match = re.search(r"\bAS\s+(\S+)", rest, re.IGNORECASE)
            stages.append(Stage(match.group(1) if match else str(len(stages)), image, []))
        elif not stages and instruction == "ARG":
            name, _, default = rest.partition("=")
            global_args[name] = default
        elif stages:
            stages[-1].instructions.append((instruction, rest))
    return stages


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return {s.name: s for s in _dockerfile_stages((REPO / "configs" / "Dockerfile").read_text())}


def _chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """A stage and the stages it is built FROM, base first."""
    chain = [stages[name]]
    while chain[0].base in stages:
        chain.insert(0, stages[chain[0].base])
    return chain


def _last(stages: dict[str, Stage], name: str, instruction: str) -> str | None:
    values = [rest for s in _chain(stages, name) for i, rest in s.instructions if i == instruction]
    return values[-1] if values else None


def test_dockerfile_base_images_are_pinned(stages: dict[str, Stage]) -> None:
    external = [s.base for s in stages.values() if s.base not in stages]
    assert external
    for image in external:
        tag = image.rpartition("/")[2].partition(":")[2]
        assert "@sha256:" in image or re.match(r"\d+\.\d+\.\d+", tag), f"{image} is not pinned to a release"


def test_dockerfile_images_run_as_the_manifests_non_root_user(stages: dict[str, Stage]) -> None:
    renders = [Rendered(v, _config(v), render_manifests(_config(v), v)) for v in OVERLAYS]
    run_as = {c["securityContext"]["runAsUser"]
              for r in renders for _, t in _pod_templates(r)
              for c in _containers(t["spec"]) if "runAsUser" in c.get("securityContext", {})}
    assert len(run_as) == 1
    for target in ("router", "prepare"):
        user = _last(stages, target, "USER")
        assert user is not None, f"{target}: no USER"
        uid = user.partition(":")[0]
        assert uid not in ("root", "0")
        assert int(uid) in run_as


def test_dockerfile_router_is_small_healthchecked_and_default(stages: dict[str, Stage]) -> None:
    assert list(stages)[-1] == "router", "the default build target is the router"
    installs = " ".join(rest for s in _chain(stages, "router") for i, rest in s.instructions if i == "RUN")
    assert "pip install" in installs
    assert not re.search(r"torch|vllm|\[model\]", installs), "the router image must not carry torch or vLLM"
    healthcheck = _last(stages, "router", "HEALTHCHECK")
    assert healthcheck is not None and f"127.0.0.1:{RouterConfig().port}/health" in healthcheck
    assert _last(stages, "prepare", "HEALTHCHECK") is not None
    prepare_installs = " ".join(rest for i, rest in stages["prepare"].instructions if i == "RUN")
    assert "[model]" in prepare_installs, "the prepare Job needs the model extra"
    for target in ("router", "prepare"):
        assert _last(stages, target, "ENTRYPOINT") == '["jv4-vllm"]'
