"""Dataclass fields as command-line flags. The engine's options (``tandem.config.EngineConfig``) and the
server's (``tandem.server.options.ServeOptions``) are each one declared list; their flags come from here.

A field's metadata: ``help`` (required), ``choices`` (a collection, or a callable returning one, so a
registry is imported only when the parser is built), ``cli`` (False: not a flag). Types come from the
annotation: int, float, str, bool (``--x`` / ``--no-x``), list[...] (one or more values)."""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable
from typing import Any

_TYPES = {"int": int, "float": float, "str": str}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def cli_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def add_fields(group: argparse._ActionsContainer, fields: Iterable[dataclasses.Field],
               defaults: dict[str, Any] | None = None) -> None:
    """One flag per field, named after it; ``defaults`` overrides the fields' own defaults."""
    for f in fields:
        default = (defaults or {}).get(f.name, field_default(f))
        kind = f.type.split("|")[0].strip()
        help_text = f.metadata["help"]
        if default not in (None, False, True) and "default:" not in help_text:
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": help_text}
        choices = f.metadata.get("choices")
        if choices is not None:
            kwargs["choices"] = sorted(choices() if callable(choices) else choices)
        if kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind.startswith("list["):
            kwargs.update(nargs="+", type=_TYPES[kind[5:-1]])
        else:
            kwargs["type"] = _TYPES[kind]
        group.add_argument(flag(f.name), **kwargs)


def from_namespace(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """``cls`` built from the flags ``add_fields`` declared for it (plus ``extra``, e.g. non-flag fields)."""
    return cls(**{f.name: getattr(args, f.name) for f in cli_fields(cls)}, **extra)
