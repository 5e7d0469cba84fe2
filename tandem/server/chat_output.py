"""A chat choice's text as OpenAI's message: ``reasoning_content`` (``--reasoning-parser``), then
``content`` and ``tool_calls`` (``--tool-call-parser`` under ``tool_choice: "auto"``, or the JSON
that ``"required"`` / a named function constrain the output to), streamed as deltas or whole.

Both ways run the same scanners (``tandem.server.reasoning``, ``tandem.server.tools``): a whole
text is one delta with ``final``, so what a stream's deltas add up to is what the response says.
A request that needs none of this (no reasoning parser, no tools to parse) gets no ``ChatOutput``
and keeps the plain path: its text is its content."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from tandem.sampling_params import SamplingParams

from tandem.server.constraints import Constraint
from tandem.server.errors import APIError
from tandem.server.reasoning import ReasoningParser, ReasoningStream, reasoning_parser
from tandem.server.tools import ToolCallStream, ToolParser, tool_parser
from tandem.server.tools.forced import NamedCallStream, RequiredToolParser
from tandem.server.tools.protocol import ToolFields
from tandem.server.tools.request import ToolUse, tool_use
from tandem.tokenizer import Tokenizer

PROMPT_TAIL_TOKENS = 16  # where a template leaves <think> open: the end of the generation prompt


@dataclass(frozen=True)
class ChatParsing:
    """The server's options: ``--tool-call-parser``, ``--enable-auto-tool-choice``, ``--reasoning-parser``."""

    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False
    reasoning_parser: str | None = None

    def check(self) -> None:
        """ValueError (a start-up error) for an unknown name or a flag missing its partner."""
        if self.tool_call_parser is not None:
            tool_parser(self.tool_call_parser)
        if self.reasoning_parser is not None:
            reasoning_parser(self.reasoning_parser)
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser NAME")

    @property
    def auto_parser(self) -> str | None:
        return self.tool_call_parser if self.enable_auto_tool_choice else None

    def request(self, body: ToolFields, constraint: Constraint | None) -> ChatRequestParsing:
        """One chat request's tool fields checked (400 naming the field), and the output constraint it
        gets: the request's own, or the one tool_choice "required" or a named function needs (both: 400)."""
        use = tool_use(body.tools, body.tool_choice, body.parallel_tool_calls, self.auto_parser)
        tools_constraint = None
        if use.schema is not None:
            # compact JSON (", " and ": " only): a model cannot pad a call with whitespace forever
            tools_constraint = Constraint("json", use.schema, "tool_choice", disable_any_whitespace=True)
        elif use.structural_tag is not None:
            tools_constraint = Constraint("structural_tag", use.structural_tag, "tools")
        if tools_constraint is not None and constraint is not None:
            raise APIError(400, f"{tools_constraint.field} constrains the output to tool calls, and "
                                f"{constraint.field} asks for another constraint; a request may have one",
                           tools_constraint.param)
        return ChatRequestParsing(self, use, tools_constraint or constraint, body.include_reasoning)

    def output(self, tools: ToolUse, include_reasoning: bool, prompt_tail: str) -> ChatOutput | None:
        """How one request's choices are read; None when their text is simply their content."""
        reasoning = None if self.reasoning_parser is None else reasoning_parser(self.reasoning_parser)
        if reasoning is None and tools.mode == "none":
            return None
        in_reasoning = reasoning is not None and reasoning.opens_in_reasoning(prompt_tail)
        parser = {"auto": lambda: tool_parser(self.tool_call_parser or ""),
                  "required": RequiredToolParser}.get(tools.mode, lambda: None)()
        return ChatOutput(reasoning, in_reasoning, include_reasoning, parser, tools.named, tools.parallel)


@dataclass
class ChatRequestParsing:
    """What serving needs of one chat request: the template's tools, the output constraint, and
    (once its prompt is known) how its choices are read."""

    parsing: ChatParsing
    use: ToolUse
    constraint: Constraint | None  # the output constraint, the request's or tool_choice's
    include_reasoning: bool

    @property
    def tools(self) -> list[dict[str, Any]] | None:
        return self.use.tools

    def output(self, tokenizer: Tokenizer | None, prompt_ids: list[int]) -> ChatOutput | None:
        """How the choices are read, given the prompt."""
        reads_prompt = tokenizer is not None and self.parsing.reasoning_parser is not None
        tail = tokenizer.decode(prompt_ids[-PROMPT_TAIL_TOKENS:], False) if reads_prompt else ""
        output = self.parsing.output(self.use, self.include_reasoning, tail)
        if output is not None:
            output.thinking_off = output.reasoning is not None and output.reasoning.prompt_closed(tail)
        return output

    def after_reasoning(self, params: SamplingParams, output: ChatOutput | None,
                        tokenizer: Tokenizer | None) -> SamplingParams:
        """The output constraint starts after the reasoning: from the first ``</think>`` where the
        prompt opened it; where the model may open it (its ``<think>`` one token), after it if it does."""
        spec = params.structured_outputs
        if spec is None or output is None or output.reasoning is None or output.thinking_off:
            return params
        start = None if output.in_reasoning else output.reasoning.start
        if start is not None and len(tokenizer.encode(start, add_special_tokens=False)) != 1:
            return params  # the model cannot open it with one token: the constraint applies from the start
        tags = dataclasses.replace(spec, reasoning_start=start, reasoning_end=output.reasoning.end)
        return dataclasses.replace(params, structured_outputs=tags)


@dataclass
class ChatOutput:
    """How the choices of one request are read."""

    reasoning: ReasoningParser | None
    in_reasoning: bool  # the prompt leaves the output inside the reasoning
    include_reasoning: bool  # False: reasoning is parsed out and dropped (vLLM's include_reasoning)
    tools: ToolParser | None  # the format calls are read in (auto, required)
    named: str | None = None  # tool_choice names this function: the content is its arguments
    parallel: bool = True
    thinking_off: bool = False  # the prompt closed an empty think block (enable_thinking: false)

    def stream(self) -> ChatChoiceStream:
        return ChatChoiceStream(self)

    def message(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The whole choice: its message and its finish reason."""
        choice = self.stream()
        delta = choice.feed(text, True)
        message: dict[str, Any] = {"role": "assistant", "content": delta.get("content") or None}
        if self.reasoning is not None:
            message["reasoning_content"] = delta.get("reasoning_content") or None
        calls = [c.as_dict() for c in choice.tools.calls] if choice.tools is not None else []
        if calls:
            message["tool_calls"] = calls
        elif message["content"] is None and not message.get("reasoning_content"):
            message["content"] = ""  # nothing at all: an empty text, as without parsing
        return message, choice.finish_reason(finish_reason)


@dataclass
class ChatChoiceStream:
    """One choice's scanners; ``feed`` returns the delta to send (keys only for what it holds)."""

    output: ChatOutput
    reasoning: ReasoningStream | None = field(init=False)
    tools: ToolCallStream | NamedCallStream | None = field(init=False)
    sent_calls: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        out = self.output
        self.reasoning = None if out.reasoning is None else ReasoningStream(out.reasoning, out.in_reasoning)
        if out.named is not None:
            self.tools = NamedCallStream(out.named, ToolParser().new_id())
        else:
            self.tools = None if out.tools is None else ToolCallStream(out.tools, out.parallel)

    def feed(self, text: str, final: bool) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        content = text
        if self.reasoning is not None:
            split = self.reasoning.feed(text, final)
            content = split.content
            if split.reasoning and self.output.include_reasoning:
                delta["reasoning_content"] = split.reasoning
        if self.tools is None:
            if content:
                delta["content"] = content
            return delta
        found = self.tools.feed(content, final)
        if found.content:
            delta["content"] = found.content
        items = [{"index": self.sent_calls + i, **call.as_dict()} for i, call in enumerate(found.calls)]
        self.sent_calls += len(found.calls)
        if found.arguments:
            items.append({"index": self.sent_calls - 1, "function": {"arguments": found.arguments}})
        if items:
            delta["tool_calls"] = items
        return delta

    def finish_reason(self, reason: str | None) -> str | None:
        """A choice that ended by itself after calls ends in "tool_calls" (a named function's in
        "stop", as OpenAI answers a forced function)."""
        if reason == "stop" and self.output.named is None and self.tools is not None and self.tools.calls:
            return "tool_calls"
        return reason
