"""Environment twins of ``jv4-vllm`` flags: one naming rule and one parser for every subcommand.

A twin is ``JV4_<COMMAND>_<FLAG>`` (``JV4_PREPARE_OUT`` for ``prepare --out``), unique per
subcommand. Shared on purpose: ``JV4_CONFIG`` (``--config``: every command that reads the
service config reads the same file), ``JV4_LOG_LEVEL`` (a flag of ``jv4-vllm`` itself) and
``JV4_API_KEY`` (the router key the bulk jobs send, one secret for both). A twin holding a bad
value is a one-line error when its own command runs, as a bad flag is.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

__all__ = ["SHARED_TWINS", "add_flag", "twin_name"]

SHARED_TWINS = {"--config": "JV4_CONFIG", "--log-level": "JV4_LOG_LEVEL", "--api-key": "JV4_API_KEY"}
_ON, _OFF = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


def twin_name(command: str, flag: str) -> str:
    """The environment twin of ``flag`` of ``command`` ("" for the top-level parser)."""
    if flag in SHARED_TWINS:
        return SHARED_TWINS[flag]
    return "_".join(["JV4", *(p.upper().replace("-", "_") for p in (command, flag.lstrip("-")) if p)])


def add_flag(parser: argparse.ArgumentParser | argparse._ActionsContainer, command: str, *flags: str,
             **kwargs: Any) -> None:
    """A flag (its long name first, aliases after) whose default comes from its twin, checked as
    the flag would be. ``action="store_true"`` twins take 1/true/yes/on or 0/false/no/off."""
    twin = twin_name(command, flags[0])
    raw = os.environ.get(twin)
    if raw is not None:
        problem, value = _twin_value(raw, kwargs)
        if problem:
            parser.set_defaults(bad_twin=f"{twin}={raw!r}: {problem} (the environment twin of "
                                         f"{' '.join(filter(None, ['jv4-vllm', command, flags[0]]))})")
        else:
            kwargs["default"] = value
            if "required" in kwargs:
                kwargs["required"] = False
    kwargs["help"] = f"{kwargs.get('help', '')} [env {twin}]".strip()
    parser.add_argument(*flags, **kwargs)


def _twin_value(raw: str, kwargs: dict[str, Any]) -> tuple[str | None, Any]:
    """(what is wrong or None, the value) of a twin, by the flag's action, type, nargs and choices."""
    if kwargs.get("action") == "store_true":
        word = raw.strip().lower()
        return (None, word in _ON) if word in _ON | _OFF else ("use 1/true/yes or 0/false/no", None)
    convert = kwargs.get("type", str)
    try:
        value = [convert(v) for v in raw.replace(",", " ").split()] if kwargs.get("nargs") == "*" else convert(raw)
    except (TypeError, ValueError):
        return f"not a valid {getattr(convert, '__name__', 'value')}", None
    choices = kwargs.get("choices")
    if choices is not None and value not in choices:
        return f"use one of {', '.join(map(str, choices))}", None
    return None, value
