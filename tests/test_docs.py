"""The documentation site builds with ``mkdocs build --strict``, and its generated pages cover the code.

The configuration and API pages are generated from the pydantic models and the router's
routes at build time; these tests walk the same code on their own and check that every
config key, every route and every request field made it onto the built pages, so a key or
field added later is covered without touching the docs.
"""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 300


def _models(annotation: typing.Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in typing.get_args(annotation):
        yield from _models(arg)


def config_keys(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, str | None]]:
    """Every key of the config tree with its description: a mapping of sections is
    ``key.<name>.field``, a list of them ``key[].field``."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        yield key, field.description
        annotation = field.annotation
        container = next((arg for arg in (annotation, *typing.get_args(annotation))
                          if typing.get_origin(arg) in (dict, list, tuple)), None)
        if container is None:
            nested = f"{key}."
        else:
            nested = f"{key}.<name>." if typing.get_origin(container) is dict else f"{key}[]."
        for inner in _models(container if container is not None else annotation):
            yield from config_keys(inner, nested)


def request_fields(model: type[BaseModel], seen: set[type[BaseModel]] | None = None) -> Iterator[str]:
    """The field names of a request model and of every object it holds."""
    seen = set() if seen is None else seen
    seen.add(model)
    for name, field in model.model_fields.items():
        yield field.alias or name
        for inner in _models(field.annotation):
            if inner not in seen:
                yield from request_fields(inner, seen)


def page_html(site: Path, page: str) -> str:
    return (site / page / "index.html").read_text(encoding="utf-8")


def page_text(site: Path, page: str) -> str:
    """A built page's visible text, whitespace collapsed."""
    raw = re.sub(r"<(script|style)\b.*?</\1>", " ", page_html(site, page), flags=re.DOTALL)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", raw)).split())


def plain(text: str) -> str:
    """Markdown text as the page shows it (code spans lose their backticks)."""
    return " ".join(text.replace("`", "").split())


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                           check=False, cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{build.stdout}\n{build.stderr}"
    return out


def test_configuration_page_lists_every_config_key(site: Path) -> None:
    from jv4_vllm.config import Config

    text = page_text(site, "configuration")
    keys = list(config_keys(Config))
    assert len(keys) > 40  # the walk reached the nested sections
    missing = [key for key, _ in keys if key not in text]
    assert not missing, f"config keys missing from the generated configuration page: {missing}"
    undescribed = [key for key, description in keys if description and plain(description) not in text]
    assert not undescribed, f"descriptions missing from the configuration page: {undescribed}"


def test_api_page_covers_every_route_and_request_field(site: Path) -> None:
    from fastapi.routing import APIRoute

    from jv4_vllm.config import Config
    from jv4_vllm.router.app import create_app

    app = create_app(Config.model_validate({"deployments": {"retrieval": {"urls": ["http://127.0.0.1:1"]}}}))
    text, markup = page_text(site, "api"), page_html(site, "api")
    routes = [route for route in app.routes if isinstance(route, APIRoute)]
    assert {"/v1/embeddings", "/v1/rerank", "/v1/models", "/health", "/ready", "/metrics"} <= {r.path for r in routes}
    assert not [route.path for route in routes if route.path not in text]
    for route in routes:
        for model in [param.field_info.annotation for param in route.dependant.body_params
                      if isinstance(param.field_info.annotation, type)
                      and issubclass(param.field_info.annotation, BaseModel)]:
            missing = [name for name in request_fields(model) if f"<code>{html.escape(name)}</code>" not in markup]
            assert not missing, f"{route.path}: request fields missing from the API page: {missing}"
            for name, field in model.model_fields.items():
                if field.description:
                    assert plain(field.description) in text, f"{route.path}: {name}'s description"


def test_client_reference_is_generated_from_docstrings(site: Path) -> None:
    text = page_text(site, "reference/client")
    for name in ("AsyncClient", "Client", "encode_text", "encode_image", "encode_pdf", "rerank"):
        assert name in text
    assert ":class:" not in text and ":meth:" not in text


def test_readme_is_a_landing_page() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= README_MAX_LINES
    first_screen = "\n".join(readme.splitlines()[:60])
    for route in ("/v1/embeddings", "/v1/rerank", "/v1/models", "/health", "/ready", "/metrics"):
        assert route in first_screen, route
    for needed in ("scripts/demo.sh", "scripts/test.sh", "curl", "40 GB", "API keys", "jv4-vllm prepare",
                   "jv4-vllm up", "jv4-vllm verify"):
        assert needed in first_screen, needed
    for target in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / target).is_file(), f"README links to {target}, which does not exist"
