"""Request bodies of the OpenAI-compatible routes (pydantic: FastAPI validates them, a failure
becomes a 400 naming the field, and the OpenAPI schema is generated from these same models).

Parsing is strict: an integer field takes a JSON number with no fraction only (``5`` or ``5.0``: JSON
has one number type, and JSON Schema calls both integers), a boolean field ``true`` or ``false`` only,
a string field a string only (no ``"5"`` read as 5, no ``"yes"`` as true), a ``logit_bias`` key ASCII
decimal digits only (no ``"5_0"``, no ``"\u0663"``). Ranges are the engine's own (``SamplingParams``:
logprobs up to 20, penalties, logit bias values), so the server, the offline API and the schema agree.

Limits that depend on the served model or the server's options (vocabulary size, context length,
stop-string caps, ``n`` and prompts per request, model names) are checked by the engine's
``InputProcessor`` and the per-request limits; the fields they apply to carry a ``LIMIT_KEY`` mark,
which ``tandem.server.openapi`` fills in per app with the numbers those objects enforce.

Every request field of OpenAI's and vLLM's completion and chat schemas is known here: implemented,
or refused (400 naming it) unless it holds its neutral value (``protocol_extras``), and the schema
allows only that value; ``tests/test_api_fields.py`` walks both lists. Truly unknown fields are
ignored, as vLLM does (clients such as LangChain and lm-eval send fields of their own), and logged:
each distinct set of names once. ``null`` in a field of a
completion or chat request means its default (clients send it for fields they leave unset), and the
schema says so. Output constraints (``response_format``, ``structured_outputs``, ``guided_*``) are
``tandem.server.constraints``'."""
from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from tandem.sampling_params import MIN_REPETITION_PENALTY, SEED_MAX, SEED_MIN
from tandem.server.constraints import GuidedFields
from tandem.server.protocol_extras import (InformationalFields, RefusedChatFields, RefusedCompletionFields,
                                           RefusedVLLMFields)
from tandem.server.protocol_types import (INT64_MAX, INTEGRAL, LIMIT_KEY, STRICT, AllowedTokens, Int64Count,
                                          LogitBias, Logprobs, ModelName, NonEmptyStr, OnlyFalse, Penalty, PromptList, StopString,
                                          StopStrings, TokenIdList, TokenIds, TruncateTokens, Words, limit,
                                          null_means_default, refused)
from tandem.server.request_limits import PROTOCOL_MAX_N
from tandem.server.tools.protocol import ChatTool, MessageToolFields, ToolFields
from tandem.tokenizer import RESERVED_TEMPLATE_KWARGS

log = logging.getLogger(__name__)

__all__ = ["LIMIT_KEY", "SamplingRequest", "CompletionRequest", "ChatCompletionRequest", "ChatMessage",
           "TokenizeRequest", "DetokenizeRequest", "TokenizeResponse", "DetokenizeResponse", "StreamOptions"]

MaxTokens = Annotated[int, Field(ge=1, json_schema_extra=limit("max_tokens")), INTEGRAL]
# completions: 0 with echo scores the prompt without generating (the schema's if/then says so)
CompletionMaxTokens = Annotated[int, Field(ge=0, json_schema_extra=limit("max_tokens")), INTEGRAL]
TemplateKwargs = Annotated[dict[str, Any], Field(json_schema_extra={
    "propertyNames": {"not": {"enum": sorted(RESERVED_TEMPLATE_KWARGS)}}})]
ChatTemplate = Annotated[str, Field(min_length=1, json_schema_extra=limit("chat_template"))]


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, every chunk carries the usage so far
    include_obfuscation: OnlyFalse | None = None  # OpenAI's padding field: never sent here


_NOTED: set[tuple[str, ...]] = set()
_NOTED_MAX = 256  # distinct sets of unknown field names logged; then no more (a client could vary them)


def note_unknown_fields(kind: str, data: dict, known: dict) -> None:
    """Fields in neither OpenAI's nor vLLM's schema are ignored, as vLLM does (clients such as
    LangChain and lm-eval send their own), but not silently: the server logs each distinct set once."""
    names = set(known) | {f.alias for f in known.values() if f.alias}
    unknown = tuple(sorted(k for k in data if k not in names))
    if unknown and unknown not in _NOTED and len(_NOTED) < _NOTED_MAX:
        _NOTED.add(unknown)
        log.warning("%s: ignoring fields that are in neither OpenAI's nor vLLM's schema: %s", kind, ", ".join(unknown))


class LogsUnknownFields(BaseModel):
    """A request whose unknown fields are ignored, and logged (``note_unknown_fields``)."""

    @model_validator(mode="before")
    @classmethod
    def _log_unknown(cls, data: Any) -> Any:
        if isinstance(data, dict):
            note_unknown_fields(cls.__name__, data, cls.model_fields)
        return data


class SamplingRequest(LogsUnknownFields, InformationalFields, RefusedVLLMFields, GuidedFields):
    """The fields completions and chat share."""

    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra=null_means_default)
    model: ModelName | None = None
    temperature: Annotated[float, Field(ge=0.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=INT64_MAX), INTEGRAL] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX), INTEGRAL] | None = None
    stop: StopString | StopStrings | None = None
    stop_token_ids: TokenIdList | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    n: Annotated[int, Field(ge=1, le=PROTOCOL_MAX_N, json_schema_extra=limit("n")), INTEGRAL] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Field(ge=MIN_REPETITION_PENALTY, le=10.0)] | None = None
    logit_bias: LogitBias | None = None
    min_tokens: Int64Count | None = None
    bad_words: Words | None = None
    allowed_token_ids: AllowedTokens | None = None
    prompt_logprobs: Logprobs | None = None  # vLLM's: each prompt token's logprob and this many alternatives
    truncate_prompt_tokens: TruncateTokens | None = None  # keep this many prompt tokens (-1: the context's)
    truncation_side: Literal["left", "right"] | None = None  # which end goes (default left: keep the last)
    echo: bool = False
    return_tokens_as_token_ids: bool | None = None  # logprob tokens as "token_id:<id>"
    return_token_ids: bool | None = None  # the prompt's and each choice's token ids in the response
    request_id: NonEmptyStr | None = None  # the response's id (after "cmpl-" / "chatcmpl-")

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        """Clients (LangChain...) send ``null`` for fields they leave unset: the default applies.
        Not for ``max_tokens``, where null means "up to the context" (as in vLLM)."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k == "max_tokens"}
        return data

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        """vLLM's rule: usage in every chunk when both include_usage and continuous_usage_stats are on."""
        return self.include_usage and self.stream_options.continuous_usage_stats

    def sampling_kwargs(self) -> dict[str, Any]:
        """SamplingParams keywords (None = the default), without max_tokens."""
        bias = None if self.logit_bias is None else {int(k): v for k, v in self.logit_bias.items()}
        values = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                      seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
                      ignore_eos=self.ignore_eos, include_stop_str_in_output=self.include_stop_str_in_output,
                      skip_special_tokens=self.skip_special_tokens, presence_penalty=self.presence_penalty,
                      frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
                      min_tokens=self.min_tokens, logit_bias=bias, bad_words=self.bad_words,
                      allowed_token_ids=self.allowed_token_ids, **self.logprob_kwargs())
        return {k: v for k, v in values.items() if v is not None}

    def logprob_kwargs(self) -> dict[str, Any]:
        return {}

    def engine_prompt_logprobs(self, echoed: int | None) -> int | None:
        """The engine's prompt_logprobs: enough for ``prompt_logprobs`` and for an echo that lists
        the prompt's logprobs with ``echoed`` alternatives."""
        wanted = [k for k in (self.prompt_logprobs, echoed) if k is not None]
        return max(wanted) if wanted else None

    @property
    def top_logprobs_wanted(self) -> int | None:
        """How many alternatives a response lists per token (None: no logprobs in the response)."""
        return None


class CompletionRequest(SamplingRequest, RefusedCompletionFields):
    model_config = ConfigDict(json_schema_extra=lambda s: _completion_schema(s))
    prompt: NonEmptyStr | PromptList[NonEmptyStr] | TokenIds | PromptList[TokenIds]
    max_tokens: CompletionMaxTokens | None = 16
    best_of: Annotated[Literal[1], refused(1), INTEGRAL] | None = None
    logprobs: Logprobs | None = None
    suffix: Annotated[str, Field(max_length=0), refused("")] | None = None
    add_special_tokens: bool = True  # the tokenizer's BOS (and the like) before a text prompt

    @field_validator("max_tokens")
    @classmethod
    def _zero_needs_echo(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value == 0 and not info.data.get("echo"):
            raise ValueError("max_tokens 0 generates nothing: it needs echo (to score the prompt)")
        return value

    def logprob_kwargs(self) -> dict[str, Any]:
        """``echo`` with ``logprobs`` also returns the prompt's (lm-eval's loglikelihood asks so)."""
        return {"logprobs": self.logprobs,
                "prompt_logprobs": self.engine_prompt_logprobs(self.logprobs if self.echo else None)}

    @property
    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs


def _completion_schema(schema: dict[str, Any]) -> None:
    null_means_default(schema)
    schema["if"] = {"required": ["max_tokens"], "properties": {"max_tokens": {"const": 0}}}
    schema["then"] = {"required": ["echo"], "properties": {"echo": {"const": True}}}


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class ChatMessage(MessageToolFields):
    model_config = STRICT
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    @property
    def text(self) -> str:
        content = self.content
        return "".join(part.text for part in content) if isinstance(content, list) else (content or "")

    def as_template_input(self) -> dict[str, Any]:
        """What chat templates expect: content as one string."""
        message: dict[str, Any] = {"role": self.role, "content": self.text}
        if self.name:
            message["name"] = self.name
        message.update(self.tool_template_fields())  # tool calls, tool results, reasoning
        return message


def _chat_schema(schema: dict[str, Any]) -> None:
    null_means_default(schema)
    # top_logprobs (an integer, not null) asks for logprobs: true
    schema["if"] = {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer"}}}
    schema["then"] = {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}
    _one_way_to_end(schema)


def _one_way_to_end(schema: dict[str, Any]) -> None:
    """add_generation_prompt and continue_final_message are not both true."""
    schema["not"] = {"required": ["add_generation_prompt", "continue_final_message"], "properties": {
        "add_generation_prompt": {"const": True}, "continue_final_message": {"const": True}}}


def _tokenize_schema(schema: dict[str, Any]) -> None:
    schema["oneOf"] = [{"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
                       {"required": ["messages"], "properties": {"messages": {"type": "array"}}}]
    _one_way_to_end(schema)


class ChatTemplateFields(BaseModel):
    """How the conversation becomes the prompt (vLLM's fields; ``tandem.tokenizer.ChatOptions``)."""

    # default: true, unless continue_final_message (the two exclude each other)
    add_generation_prompt: bool | None = None
    continue_final_message: bool = False
    documents: list[dict[str, str]] | None = None
    chat_template: ChatTemplate | None = None  # refused unless --trust-request-chat-template
    chat_template_kwargs: TemplateKwargs | None = None


class ChatCompletionRequest(SamplingRequest, ChatTemplateFields, ToolFields, RefusedChatFields):
    model_config = ConfigDict(json_schema_extra=_chat_schema)
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: MaxTokens | None = None
    max_tokens: MaxTokens | None = None  # deprecated by OpenAI in favour of max_completion_tokens; still sent
    logprobs: bool = False
    top_logprobs: Logprobs | None = None
    add_special_tokens: bool = False  # the template writes the special tokens it wants
    return_prompt_text: bool = False  # vLLM's: the rendered prompt in the response

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int, info: ValidationInfo) -> int:
        if not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprob_kwargs(self) -> dict[str, Any]:
        return {"logprobs": (self.top_logprobs or 0) if self.logprobs else None,
                "prompt_logprobs": self.prompt_logprobs}

    @property
    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(LogsUnknownFields, ChatTemplateFields):
    """Exactly one of ``prompt`` and ``messages`` (``null`` counts as absent)."""

    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra=_tokenize_schema)
    model: ModelName | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages (the template's)
    return_token_strs: bool = False  # each token's text too
    tools: list[ChatTool] | None = None  # rendered by the chat template, as in a chat request
    mm_processor_kwargs: Annotated[dict[str, Any], Field(max_length=0), refused({})] | None = None

    @model_validator(mode="after")
    def _exactly_one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = STRICT
    model: ModelName | None = None
    tokens: TokenIdList


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str
