"""Tool-call parsers by name (``--tool-call-parser NAME``; vLLM's names)."""
from __future__ import annotations

from tandem.server.tools.base import ToolParser
from tandem.server.tools.hermes import HermesToolParser
from tandem.server.tools.llama3_json import Llama3JsonToolParser
from tandem.server.tools.mistral import MistralToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,  # Hermes 2/3, Qwen 2.5, Qwen 3
    "llama3_json": Llama3JsonToolParser,  # Llama 3.1, 3.2, 3.3
    "mistral": MistralToolParser,
}


def tool_parser(name: str) -> ToolParser:
    try:
        return TOOL_PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r}; known: {', '.join(sorted(TOOL_PARSERS))}") from None
