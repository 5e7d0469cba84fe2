"""Reasoning parsers by name (``--reasoning-parser NAME``; vLLM's names)."""
from __future__ import annotations

from tandem.server.reasoning.base import ReasoningParser
from tandem.server.reasoning.deepseek_r1 import DeepSeekR1ReasoningParser
from tandem.server.reasoning.qwen3 import Qwen3ReasoningParser

REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    "deepseek_r1": DeepSeekR1ReasoningParser,
    "qwen3": Qwen3ReasoningParser,
}


def reasoning_parser(name: str) -> ReasoningParser:
    try:
        return REASONING_PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown reasoning parser {name!r}; known: {', '.join(sorted(REASONING_PARSERS))}") \
            from None
