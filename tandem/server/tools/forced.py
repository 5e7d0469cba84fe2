"""``tool_choice: "required"`` and a named function: the output is constrained to JSON by a schema
made from the request's tools (structured output), so it is read as JSON, not by a model's format.

- required: ``[{"name": <one of the tools>, "parameters": {...}}, ...]``, at least one call (exactly
  one with ``parallel_tool_calls: false``); each call's parameters follow its tool's schema.
- a named function: the output is that function's arguments object, streamed as it comes."""
from __future__ import annotations

from typing import Any

from tandem.server.tools.base import ToolCall, ToolDelta, ToolParser
from tandem.server.tools.json_calls import calls_of, json_values

ANY_OBJECT: dict[str, Any] = {"type": "object"}


def parameters_schema(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or ANY_OBJECT


def required_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    calls = [{"type": "object",
              "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                             "parameters": parameters_schema(t)},
              "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


class RequiredToolParser(ToolParser):
    """The whole output is the JSON array the schema above describes."""

    name = "required"
    bare_start = "["

    def decode(self, body: str) -> list[tuple[str, str]] | None:
        values = json_values(body)
        if values is None or len(values) != 1 or not isinstance(values[0], list):
            return None
        return calls_of(values[0])


class NamedCallStream:
    """A named function: the whole text is its arguments, sent as it comes (the first delta names it)."""

    def __init__(self, name: str, call_id: str) -> None:
        self.call = ToolCall(name, "", call_id)
        self.calls = [self.call]
        self.started = False

    def feed(self, text: str, final: bool = False) -> ToolDelta:
        self.call.arguments += text
        if self.started:
            return ToolDelta(arguments=text)
        if not text and not final:
            return ToolDelta()
        self.started = True
        return ToolDelta(calls=[ToolCall(self.call.name, text, self.call.id)])
