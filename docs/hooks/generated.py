"""mkdocs hook: the pages' generated parts, read from the code at build time.

A page asks for them with HTML comments, each replaced by Markdown:

- ``<!-- generated: config -->``: every config key, walked from :class:`jv4_vllm.config.Config`;
- ``<!-- generated: route METHOD PATH -->``: one route of the router, its request fields
  (and those of every object they hold), query parameters, response fields and statuses;
- ``<!-- generated: other-routes -->``: every route the page does not name;
- ``<!-- generated: errors -->``: the error body every route shares;
- ``<!-- generated: reference MODULE[:NAME] ... -->``: mkdocstrings entries for a module's
  ``__all__`` (or one name), each where it is defined.

So the reference tables follow the models and the routes the app really has.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]  # document this checkout

from model_tables import config_sections, field_table, fields_table, models_in, own_doc
from pydantic import BaseModel

_DIRECTIVE = re.compile(r"<!--\s*generated:\s*(?P<what>[\w-]+)(?P<args>[^>]*?)\s*-->")


# --- configuration ------------------------------------------------------------------------


def config_reference() -> str:
    """One table per config section, the key paths and environment twins included."""
    from jv4_vllm.config import Config

    parts = []
    for section in config_sections(Config):
        title = section.prefix.rstrip(".") or "top level"
        doc = own_doc(section.model)
        table = field_table(section.model, prefix=section.prefix, env=section.env)
        parts.append("\n\n".join(part for part in (f"### `{title}`", doc, table) if part))
    return "\n\n".join(parts)


# --- the HTTP API ---------------------------------------------------------------------------


@functools.cache
def _app() -> Any:
    from jv4_vllm.config import Config
    from jv4_vllm.router.app import create_app

    return create_app(Config.model_validate({"deployments": {"retrieval": {"urls": ["http://127.0.0.1:1"]}}}))


@functools.cache
def routes() -> tuple[tuple[Any, tuple[str, ...]], ...]:
    """The app's API routes, one entry per endpoint with every path it answers on."""
    from fastapi.routing import APIRoute

    grouped: dict[Any, list[Any]] = {}
    for route in _app().routes:
        if isinstance(route, APIRoute):
            grouped.setdefault(route.endpoint, []).append(route)
    return tuple((found[0], tuple(r.path for r in sorted(found, key=lambda r: (not r.path.startswith("/v1"), r.path))))
                 for found in grouped.values())


def _body_models(route: Any) -> list[type[BaseModel]]:
    """The pydantic models FastAPI reads the request body into."""
    found = (next(models_in(param.field_info.annotation), None) for param in route.dependant.body_params)
    return [model for model in found if model is not None]


def _nested(model: type[BaseModel]) -> list[type[BaseModel]]:
    """The models a model's fields hold, recursively, in field order."""
    found: list[type[BaseModel]] = []
    todo = [model]
    while todo:
        for field in todo.pop(0).model_fields.values():
            for inner in models_in(field.annotation):
                if inner is not model and inner not in found:
                    found.append(inner)
                    todo.append(inner)
    return found


def _model_tables(model: type[BaseModel], shown: set[type[BaseModel]], role: str) -> list[str]:
    parts = []
    for each in [model, *_nested(model)]:
        if each in shown:
            parts.append(f"`{each.__name__}`: as above.")
            continue
        shown.add(each)
        doc = " ".join(own_doc(each).split())
        label = role if each is model else "object"
        parts.append(f"**{label} `{each.__name__}`**{': ' + doc if doc else ''}\n\n{field_table(each)}")
    return parts


def route_reference(route: Any, paths: tuple[str, ...], shown: set[type[BaseModel]]) -> str:
    summary = f"{route.summary}. " if route.summary else ""
    also = f" Also answers on {', '.join(f'`{p}`' for p in paths[1:])}." if len(paths) > 1 else ""
    parts = [f"{summary}{' '.join((inspect.getdoc(route.endpoint) or '').split())}{also}"]
    for model in _body_models(route):
        parts += _model_tables(model, shown, "Request body")
    query = {param.alias or param.name: param.field_info for param in route.dependant.query_params}
    if query:
        parts.append("**Query parameters**\n\n" + fields_table(query))
    if route.response_model is not None:
        parts += _model_tables(route.response_model, shown, "Response (200)")
    statuses = {200: "Success"} | {int(code): spec.get("description", "") for code, spec in route.responses.items()}
    parts.append("| status | meaning |\n|---|---|\n" + "\n".join(f"| {code} | {text} |" for code, text in statuses.items()))
    return "\n\n".join(parts)


def error_reference(shown: set[type[BaseModel]]) -> str:
    models: list[type[BaseModel]] = []
    for route, _ in routes():
        for spec in route.responses.values():
            model = spec.get("model")
            if model is not None and model not in models:
                models.append(model)
    return "\n\n".join(part for model in models for part in _model_tables(model, shown, "Error body"))


# --- Python reference (mkdocstrings) --------------------------------------------------------


def reference_entries(targets: list[str]) -> str:
    """``::: module.Name`` for every public class and function of the targets, where defined."""
    lines: list[str] = []
    for target in targets:
        module_name, _, name = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # an optional extra is missing: let mkdocstrings read the source
            lines.append(f"::: {target.replace(':', '.')}")
            continue
        for each in [name] if name else list(getattr(module, "__all__", [])):
            obj = getattr(module, each)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            path = f"{obj.__module__}.{obj.__qualname__}"
            if f"::: {path}" not in lines:
                lines.append(f"::: {path}")
    return "\n\n".join(lines)


# --- the hook ---------------------------------------------------------------------------------


def on_page_markdown(markdown: str, **_: Any) -> str:
    if "<!-- generated:" not in markdown:
        return markdown
    shown: set[type[BaseModel]] = set()
    named: set[str] = set()

    def explicit(match: re.Match[str]) -> str:
        what, args = match["what"], match["args"].split()
        if what == "config":
            return config_reference()
        if what == "reference":
            return reference_entries(args)
        if what == "route":
            method, path = args
            for route, paths in routes():
                if path in paths and method in route.methods:
                    named.update(paths)
                    return route_reference(route, paths, shown)
            raise ValueError(f"the router has no route {method} {path}")
        return match[0]

    markdown = _DIRECTIVE.sub(explicit, markdown)

    def rest(match: re.Match[str]) -> str:
        if match["what"] == "errors":
            return error_reference(shown)
        if match["what"] == "other-routes":
            return "\n\n".join(f"### `{', '.join(sorted(route.methods))} {paths[0]}`\n\n"
                               + route_reference(route, paths, shown)
                               for route, paths in routes() if not named.intersection(paths))
        raise ValueError(f"unknown directive {match[0]}")

    return _DIRECTIVE.sub(rest, markdown)


_ROLE = re.compile(r":(?:class|meth|func|data|attr|mod|exc|obj):(?=<code>)")


def on_page_content(html: str, **_: Any) -> str:
    """Docstrings use Sphinx roles (:class:`X`); in the rendered page only the name is kept."""
    return _ROLE.sub("", html)
