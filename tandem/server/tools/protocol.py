"""The request fields of tool calling, in OpenAI's shapes (pydantic; strict as the rest of
``tandem.server.protocol``): the tool definitions, ``tool_choice``, and the calls of an assistant
message sent back in a conversation."""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_STRICT = ConfigDict(extra="ignore", strict=True)
FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_.\-]{1,64}$")]  # OpenAI's rule (and dots)


class FunctionDefinition(BaseModel):
    model_config = _STRICT
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: any object
    strict: bool | None = None


class ChatTool(BaseModel):
    model_config = _STRICT
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = _STRICT
    name: FunctionName


class NamedToolChoice(BaseModel):
    model_config = _STRICT
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(BaseModel):
    model_config = _STRICT
    name: str
    arguments: str  # a JSON text, as OpenAI sends it


class MessageToolCall(BaseModel):
    """A call in an assistant message of the conversation (what a previous response returned)."""

    model_config = _STRICT
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall

    def as_template_input(self) -> dict[str, Any]:
        """Chat templates (transformers' convention) take the arguments as an object, not JSON text;
        arguments that are not a JSON object are passed as the text they are."""
        try:
            arguments: Any = json.loads(self.function.arguments)
        except ValueError:
            arguments = self.function.arguments
        if not isinstance(arguments, dict):
            arguments = self.function.arguments
        return {"id": self.id, "type": "function",
                "function": {"name": self.function.name, "arguments": arguments}}


class ToolFields(BaseModel):
    """The chat request's tool and reasoning fields (``ChatCompletionRequest`` inherits them)."""

    tools: list[ChatTool] | None = None  # an empty list is no tools
    tool_choice: ToolChoice | None = None  # default: "auto" with tools, "none" without
    parallel_tool_calls: bool = True  # false: at most one call
    include_reasoning: bool = True  # vLLM's: false drops reasoning_content (--reasoning-parser)


class MessageToolFields(BaseModel):
    """What a chat message may carry besides its content (``ChatMessage`` inherits them)."""

    tool_calls: list[MessageToolCall] | None = None  # an assistant message's calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    reasoning_content: str | None = None  # an assistant message's reasoning (templates may render it)

    def tool_template_fields(self) -> dict[str, Any]:
        """The keys of these fields for the chat template, only those present."""
        fields: dict[str, Any] = {}
        if self.tool_calls:
            fields["tool_calls"] = [call.as_template_input() for call in self.tool_calls]
        if self.tool_call_id is not None:
            fields["tool_call_id"] = self.tool_call_id
        if self.reasoning_content is not None:
            fields["reasoning_content"] = self.reasoning_content
        return fields


def template_tools(tools: list[ChatTool] | None) -> list[dict[str, Any]] | None:
    """The tools as chat templates take them (OpenAI's shape, unset keys left out); None for none."""
    return [t.model_dump(exclude_none=True) for t in tools] if tools else None
