"""Hermes and Qwen (2.5, 3): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one call per
block, any number of blocks, content around them. An unclosed last block counts when its JSON is whole
(a model stopped right after it)."""
from __future__ import annotations

import json

from tandem.server.tools.base import StrictFormat, ToolParser
from tandem.server.tools.json_calls import call_of


class HermesToolParser(ToolParser):
    name = "hermes"
    starts = ("<tool_call>",)
    end = "</tool_call>"
    strict_format = StrictFormat("<tool_call>", '<tool_call>\n{"name": "{name}", "arguments": ', "}\n</tool_call>")

    def decode(self, body: str) -> list[tuple[str, str]] | None:
        try:
            call = call_of(json.loads(body))
        except ValueError:
            return None
        return None if call is None else [call]
