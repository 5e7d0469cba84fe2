"""Engine options as command-line flags, derived from ``EngineConfig`` (the one list)."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from tandem.config import option_fields

_TYPES = {"int": int, "float": float, "str": str}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_engine_args(parser: argparse.ArgumentParser, default_model: str | None = "random:tiny",
                    skip: tuple[str, ...] = ()) -> None:
    group = parser.add_argument_group("engine options")
    for f in option_fields():
        if f.name in skip:
            continue
        default = default_model if f.name == "model" else f.default
        if default is dataclasses.MISSING:
            default = None
        kind = f.type.split("|")[0].strip()
        help_text = f.metadata["help"] + (f" (default: {default})" if default not in (None, False, True) else "")
        if kind == "bool":
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=default,
                               help=f.metadata["help"])
        else:
            group.add_argument(_flag(f.name), type=_TYPES[kind], default=default, help=help_text)


def engine_options(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The engine options (all but ``model``) parsed by ``add_engine_args``."""
    return {f.name: getattr(args, f.name) for f in option_fields()
            if f.name != "model" and f.name not in skip}
