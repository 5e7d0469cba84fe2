"""Llama 3.1 / 3.2 / 3.3 JSON tool calls: the whole output is ``{"name": ..., "parameters": {...}}``
(several separated by ``;``), optionally after ``<|python_tag|>`` (a special token: it is only in the
text with ``skip_special_tokens: false``). Text before a call is content; an output that starts with
``{`` but is not a list of calls stays content."""
from __future__ import annotations

from tandem.server.tools.base import StrictFormat, ToolParser
from tandem.server.tools.json_calls import calls_of, json_values


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    starts = ("<|python_tag|>",)
    end = None
    bare_start = "{"
    strict_format = StrictFormat('{"name": ', '{"name": "{name}", "parameters": ', "}")

    def decode(self, body: str) -> list[tuple[str, str]] | None:
        values = json_values(body, separators=";")
        return None if values is None else calls_of(values)
