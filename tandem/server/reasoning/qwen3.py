"""Qwen3: hybrid models write ``<think>`` themselves when thinking (their template closes an empty
block when ``enable_thinking`` is false); the thinking-only models (2507) get ``<think>`` at the end
of the prompt. So the output is reasoning when the prompt left a block open or the output opens one,
and content otherwise."""
from __future__ import annotations

from tandem.server.reasoning.base import ReasoningParser


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"

    def opens_in_reasoning(self, prompt_tail: str) -> bool:
        return self.prompt_left_open(prompt_tail)
