"""DeepSeek-R1 and its distills: the template ends the prompt with ``<think>`` (older ones let the
model write it), so the output is reasoning from its start up to ``</think>``, unless the prompt
closed a think block itself (thinking off)."""
from __future__ import annotations

from tandem.server.reasoning.base import ReasoningParser


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"

    def opens_in_reasoning(self, prompt_tail: str) -> bool:
        return not self.prompt_closed(prompt_tail)
