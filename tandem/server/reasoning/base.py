"""Reasoning in a model's text (``<think> ... </think>``): what a parser declares, and the one
scanner that splits a whole text or a stream of deltas into reasoning and content.

Where the reasoning starts depends on the prompt: templates of DeepSeek-R1 distills and of Qwen3's
thinking models end the prompt with ``<think>``, so the output starts inside the reasoning; Qwen3's
hybrid models write ``<think>`` themselves; with thinking turned off, the template closes an empty
block. ``ReasoningParser.opens_in_reasoning`` decides from the end of the prompt, so the stream
knows from its first character what it is reading, and streamed == non-streamed.

Rules, for every parser: inside the reasoning, a leading ``<think>`` of the output is dropped and
everything up to ``</think>`` is reasoning (all of it if the output ends first: a cut-off thought);
after ``</think>``, blanks are dropped and the rest is content. An output that is not inside the
reasoning is content, unless it opens with ``<think>`` (blanks before it allowed)."""
from __future__ import annotations

from dataclasses import dataclass

START, END = "<think>", "</think>"


@dataclass
class ReasoningDelta:
    reasoning: str = ""
    content: str = ""


class ReasoningParser:
    name = ""
    start, end = START, END

    def opens_in_reasoning(self, prompt_tail: str) -> bool:
        """Whether the output starts inside the reasoning, given the end of the prompt's text."""
        raise NotImplementedError

    @staticmethod
    def prompt_left_open(prompt_tail: str) -> bool:
        """The prompt opened a think block and did not close it."""
        return prompt_tail.rfind(START) > prompt_tail.rfind(END)

    @staticmethod
    def prompt_closed(prompt_tail: str) -> bool:
        """The prompt closed a think block (thinking turned off in the template)."""
        return prompt_tail.rfind(END) > max(prompt_tail.rfind(START), -1)


def _held_prefix(text: str, marker: str) -> int:
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ReasoningStream:
    """One choice's scanner: ``feed`` each new piece of the text (``final`` with the last one)."""

    def __init__(self, parser: ReasoningParser, in_reasoning: bool) -> None:
        self.parser = parser
        self.state = "open" if in_reasoning else "maybe"  # open: reasoning may begin with <think>
        self.buf = ""
        self.saw_reasoning = in_reasoning

    def feed(self, text: str, final: bool = False) -> ReasoningDelta:
        self.buf += text
        out = ReasoningDelta()
        while self._step(out, final):
            pass
        return out

    def _step(self, out: ReasoningDelta, final: bool) -> bool:
        """Decide what the text held can be; True while another decision may follow."""
        if self.state in ("open", "maybe"):
            return self._opening(final)
        if self.state == "reasoning":
            return self._reasoning(out, final)
        if self.state == "after":  # blanks right after </think> are layout
            stripped = self.buf.lstrip()
            if not stripped:
                self.buf = ""
                return False
            self.buf, self.state = stripped, "content"
        out.content += self.buf
        self.buf = ""
        return False

    def _opening(self, final: bool) -> bool:
        start = self.parser.start
        stripped = self.buf.lstrip()
        if stripped.startswith(start):
            self.buf, self.state, self.saw_reasoning = stripped[len(start):], "reasoning", True
            return True
        if start.startswith(stripped) and not final:
            return False  # blanks, or the beginning of <think>: wait
        self.state = "reasoning" if self.state == "open" else "content"
        return True

    def _reasoning(self, out: ReasoningDelta, final: bool) -> bool:
        end = self.parser.end
        i = self.buf.find(end)
        if i >= 0:
            out.reasoning += self.buf[:i]
            self.buf, self.state = self.buf[i + len(end):], "after"
            return True
        keep = 0 if final else _held_prefix(self.buf, end)
        out.reasoning += self.buf[:len(self.buf) - keep]
        self.buf = self.buf[len(self.buf) - keep:]
        return False


def parse_reasoning(parser: ReasoningParser, text: str, in_reasoning: bool) -> tuple[str | None, str]:
    """The whole output at once: (reasoning, content); reasoning is None when there was none."""
    stream = ReasoningStream(parser, in_reasoning)
    delta = stream.feed(text, final=True)
    return (delta.reasoning or None) if stream.saw_reasoning else None, delta.content
