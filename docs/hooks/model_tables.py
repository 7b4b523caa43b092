"""Markdown tables from pydantic models: one row per field, with its type, default and description.

Used by the documentation build (``generated.py``) for the configuration reference and the
HTTP API's field tables, so both follow the models and cannot drift from them.
"""

from __future__ import annotations

import enum
import inspect
import json
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

__all__ = ["ConfigSection", "config_sections", "field_table", "fields_table", "models_in", "own_doc", "type_name"]

_JSON_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null",
               bytes: "bytes", typing.Any: "any"}


def _cell(text: str) -> str:
    """Text that stays inside one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def own_doc(model: type) -> str:
    """The class's own docstring (not pydantic's, which ``inspect.getdoc`` would inherit)."""
    return inspect.cleandoc(model.__dict__.get("__doc__") or "")


def type_name(annotation: Any) -> str:
    """A short, JSON-flavoured name of a type: ``integer | null``, ``list[string]``, ``"a" | "b"``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(dict.fromkeys(type_name(arg) for arg in args))
    if origin is typing.Literal:
        return " | ".join(json.dumps(arg) for arg in args)
    if origin in (list, tuple, set, frozenset) or origin is typing.Sequence:
        inner = ", ".join(type_name(arg) for arg in args if arg is not Ellipsis)
        return f"list[{inner}]" if inner else "list"
    if origin is dict:
        return f"mapping[{type_name(args[0])}, {type_name(args[1])}]" if args else "mapping"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return annotation.__name__
        if issubclass(annotation, enum.Enum):
            return " | ".join(json.dumps(member.value) for member in annotation)
        if issubclass(annotation, PurePath):
            return "path"
        return _JSON_NAMES.get(annotation, annotation.__name__)
    return _JSON_NAMES.get(annotation, str(annotation).replace("typing.", ""))


def _constraints(field: FieldInfo) -> str:
    bounds = []
    for item in field.metadata:
        for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            value = getattr(item, attr, None)
            if isinstance(item, annotated_types.BaseMetadata) and value is not None:
                bounds.append(f"{sign} {value}")
        if isinstance(item, annotated_types.MinLen) and item.min_length:
            bounds.append(f"at least {item.min_length}")
        if isinstance(item, annotated_types.MaxLen):
            bounds.append(f"at most {item.max_length}")
    return ", ".join(bounds)


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    try:
        value = field.get_default(call_default_factory=True, validated_data={})
    except (KeyError, TypeError, ValueError):  # a factory that needs the other fields
        return "computed"
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, PurePath):
        value = str(value)
    try:
        return f"`{json.dumps(value)}`"
    except TypeError:
        return f"`{value!r}`"


def models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    """Every pydantic model a type mentions, outermost first (unions, lists, mappings, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in typing.get_args(annotation):
        yield from models_in(arg)


def field_table(model: type[BaseModel], *, prefix: str = "", env: str | None = None) -> str:
    """One Markdown table of a model's fields (``prefix`` before each name; ``env`` adds the
    environment twin column, ``JV4__SECTION__KEY``, from that prefix)."""
    return fields_table({field.alias or name: field for name, field in model.model_fields.items()},
                        prefix=prefix, env=env)


def fields_table(fields: Mapping[str, FieldInfo], *, prefix: str = "", env: str | None = None) -> str:
    """:func:`field_table` for loose fields (a route's query parameters)."""
    head = ["field", "type", "default"] + (["environment"] if env is not None else []) + ["description"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, field in fields.items():
        row = [f"`{prefix}{key}`", f"`{' '.join(type_name(field.annotation).split())}`", _default(field)]
        if env is not None:
            row.append(f"`{env}{key.upper()}`")
        limits = _constraints(field)
        description = _cell(field.description or next((own_doc(m).split("\n\n")[0] for m in models_in(field.annotation)
                                                       if own_doc(m)), ""))
        row.append(f"{description} ({limits})" if limits and description else description or limits)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class ConfigSection:
    """One model of the config tree, where it sits: ``backend.`` and ``JV4__BACKEND__``."""

    model: type[BaseModel]
    prefix: str
    env: str


def config_sections(model: type[BaseModel], prefix: str = "", env: str = "JV4__") -> Iterator[ConfigSection]:
    """The config models depth first; a mapping of models is one section under ``<name>``."""
    yield ConfigSection(model, prefix, env)
    for name, field in model.model_fields.items():
        key = field.alias or name
        annotation = field.annotation
        for arg in (annotation, *typing.get_args(annotation)):
            origin = typing.get_origin(arg)
            if origin is dict:
                for inner in models_in(typing.get_args(arg)[1]):
                    yield from config_sections(inner, f"{prefix}{key}.<name>.", f"{env}{key.upper()}__<NAME>__")
                break
            if origin in (list, tuple):
                for inner in models_in(arg):
                    yield from config_sections(inner, f"{prefix}{key}[].", f"{env}{key.upper()}__<N>__")
                break
        else:
            for inner in models_in(annotation):
                yield from config_sections(inner, f"{prefix}{key}.", f"{env}{key.upper()}__")
