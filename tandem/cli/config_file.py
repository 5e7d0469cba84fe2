"""``--config FILE.yaml`` (vLLM's): a YAML mapping of long option names to values. Its values become the
subcommand's defaults, so an option given on the command line wins; each is checked as the flag's own
value would be (type, choices), and an unknown key is an error naming the file and the key."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def load_config_file(path: str) -> dict[str, Any]:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"--config {path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: must be a mapping of option names to values, got {type(data).__name__}")
    return data


def config_defaults(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """The file's options as ``parser.set_defaults`` keywords (dest -> parsed value)."""
    actions = {s: a for a in parser._actions for s in a.option_strings if s.startswith("--")}  # noqa: SLF001
    defaults: dict[str, Any] = {}
    for key, value in load_config_file(path).items():
        name = "--" + str(key).replace("_", "-")
        action = actions.get(name)
        if action is None or name == "--config":
            raise ValueError(f"--config {path}: unknown option {key!r} (keys are `tandem {parser.prog.split()[-1]}` "
                             "long option names)")
        defaults[action.dest] = _value(action, value, f"--config {path}: {key}")
    return defaults


def _value(action: argparse.Action, value: Any, where: str) -> Any:
    if value is None:
        return None
    if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction)):  # noqa: SLF001
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if action.nargs == "+" or isinstance(action, argparse._AppendAction):  # noqa: SLF001 - a list either way
        items = value if isinstance(value, list) else [value]
        return [_scalar(action, v, where) for v in items]
    if isinstance(value, (list, dict)):
        raise ValueError(f"{where} takes one value, got {value!r}")
    return _scalar(action, value, where)


def _scalar(action: argparse.Action, value: Any, where: str) -> Any:
    if isinstance(value, bool) or isinstance(value, (list, dict)):  # YAML's true is no number or name
        raise ValueError(f"{where}: expected a single {getattr(action.type, '__name__', 'value')}, got {value!r}")
    try:
        parsed = action.type(str(value)) if action.type is not None else str(value)
    except ValueError:
        raise ValueError(f"{where}: expected {action.type.__name__}, got {value!r}") from None
    if action.choices is not None and parsed not in action.choices:
        raise ValueError(f"{where} must be one of {list(action.choices)}, got {value!r}")
    return parsed
