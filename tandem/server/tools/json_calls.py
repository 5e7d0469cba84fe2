"""Reading calls written as JSON: objects with a name and an arguments (or parameters) object."""
from __future__ import annotations

import json
from typing import Any

_DECODER = json.JSONDecoder()


def arguments_json(value: Any) -> str | None:
    """The arguments as OpenAI sends them (a JSON text of an object), or None if they are not an object.
    A JSON text of an object is accepted too (some models quote their arguments)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if not isinstance(value, dict):
        return None
    return json.dumps(value, ensure_ascii=False)


def call_of(obj: Any, keys: tuple[str, ...] = ("arguments", "parameters")) -> tuple[str, str] | None:
    """(name, arguments JSON) of ``{"name": ..., "arguments": {...}}``; None if it is not such an object.
    A call with no arguments key has the empty object."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    present = [k for k in keys if k in obj]
    arguments = arguments_json(obj[present[0]]) if present else "{}"
    return None if arguments is None else (obj["name"], arguments)


def json_values(text: str, separators: str = "") -> list[Any] | None:
    """The JSON values that make up ``text``, one after another (blanks and ``separators`` between
    them); None unless the whole text is read that way."""
    values, i, n = [], 0, len(text)
    while True:
        while i < n and (text[i].isspace() or (values and text[i] in separators)):
            i += 1
        if i == n:
            return values or None
        try:
            value, i = _DECODER.raw_decode(text, i)
        except ValueError:
            return None
        values.append(value)


def calls_of(values: list[Any]) -> list[tuple[str, str]] | None:
    calls = [call_of(v) for v in values]
    return None if not calls or any(c is None for c in calls) else calls  # type: ignore[return-value]
