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

Unknown fields are ignored, as vLLM does: clients (LangChain, lm-eval) send fields of their own.
Known fields that we do not implement are refused (400 naming them) unless they hold their neutral
value, and the schema allows only that value. ``null`` in a field of a completion or chat request
means its default (clients send it for fields they leave unset), and the schema says so."""
from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from tandem.sampling_params import MAX_LOGIT_BIAS, MAX_LOGPROBS, SEED_MAX, SEED_MIN
from tandem.server.request_limits import PROTOCOL_MAX_N

INT64_MAX = 2**63 - 1  # what the step contract carries (top_k, min_tokens, stop token ids)
LIMIT_KEY = "x-tandem-limit"  # marks a schema node whose bound depends on the served model
STRICT = ConfigDict(extra="ignore", strict=True)
T = TypeVar("T")


def _limit(name: str) -> dict[str, str]:
    return {LIMIT_KEY: name}


def _unsupported(*neutral: Any) -> BeforeValidator:
    """A field we do not implement: only its neutral values pass (the schema says which)."""

    def check(value: Any) -> Any:
        if not any(type(value) is type(n) and value == n for n in neutral):
            raise ValueError("not supported by this server")
        return value

    return BeforeValidator(check)


def _keys_as_property_names(schema: dict[str, Any]) -> None:
    """pydantic writes a dict's key pattern as ``patternProperties``, which lets other keys through;
    ``propertyNames`` says that every key must match, which is what validation does."""
    for branch in schema.get("anyOf", [schema]):
        if "patternProperties" in branch:
            ((pattern, values),) = branch.pop("patternProperties").items()
            branch["propertyNames"] = {"pattern": pattern, **_limit("bias_token")}
            branch["additionalProperties"] = values


def _null_means_default(schema: dict[str, Any]) -> None:
    """In the schema: every optional field also takes ``null`` (``SamplingRequest._drop_nulls``)."""
    required = set(schema.get("required", ()))
    for name, prop in schema.get("properties", {}).items():
        branches = prop.get("anyOf", [prop])
        if name in required or {"type": "null"} in branches:
            continue
        outer = {k: prop.pop(k) for k in ("title", "default", "description") if k in prop}
        schema["properties"][name] = {"anyOf": [prop, {"type": "null"}], **outer}


def _integral(value: Any) -> Any:
    """JSON has one kind of number: 5.0 is the integer 5 (JSON Schema agrees), "5" and true are not."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _integral_items(value: Any) -> Any:
    if isinstance(value, list) and float in set(map(type, value)):  # set(map(...)) runs in C: long prompts
        return [_integral(v) for v in value]
    return value


_INTEGRAL = BeforeValidator(_integral)
TokenId = Annotated[int, Field(ge=0, json_schema_extra=_limit("token_id"))]
TokenIdList = Annotated[list[TokenId], BeforeValidator(_integral_items)]
TokenIds = Annotated[TokenIdList, Field(min_length=1, json_schema_extra=_limit("prompt_ids"))]
NonEmptyStr = Annotated[str, Field(min_length=1)]
ModelName = Annotated[str, Field(json_schema_extra=_limit("model"))]
MaxTokens = Annotated[int, Field(ge=1, json_schema_extra=_limit("max_tokens")), _INTEGRAL]
StopString = Annotated[str, Field(min_length=1, json_schema_extra=_limit("stop_string"))]
StopStrings = Annotated[list[StopString], Field(json_schema_extra=_limit("stop_list"))]
LogitBias = Annotated[dict[Annotated[str, Field(pattern=r"^(0|[1-9][0-9]*)$")],
                           Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]],
                      Field(json_schema_extra=_keys_as_property_names)]
PromptList = Annotated[list[T], Field(min_length=1, json_schema_extra=_limit("prompt_list"))]  # a batch of prompts
Logprobs = Annotated[int, Field(ge=0, le=MAX_LOGPROBS), _INTEGRAL]
Int64Count = Annotated[int, Field(ge=0, le=INT64_MAX), _INTEGRAL]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The fields completions and chat share."""

    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra=_null_means_default)
    model: ModelName | None = None
    temperature: Annotated[float, Field(ge=0.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=INT64_MAX), _INTEGRAL] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX), _INTEGRAL] | None = None
    stop: StopString | StopStrings | None = None
    stop_token_ids: TokenIdList | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    n: Annotated[int, Field(ge=1, le=PROTOCOL_MAX_N, json_schema_extra=_limit("n")), _INTEGRAL] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    logit_bias: LogitBias | None = None
    min_tokens: Int64Count | None = None
    user: str | None = None

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

    def sampling_kwargs(self) -> dict[str, Any]:
        """SamplingParams keywords (None = the default), without max_tokens."""
        bias = None if self.logit_bias is None else {int(k): v for k, v in self.logit_bias.items()}
        values = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                      seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
                      ignore_eos=self.ignore_eos, include_stop_str_in_output=self.include_stop_str_in_output,
                      skip_special_tokens=self.skip_special_tokens, presence_penalty=self.presence_penalty,
                      frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
                      min_tokens=self.min_tokens, logit_bias=bias, **self.logprob_kwargs())
        return {k: v for k, v in values.items() if v is not None}

    def logprob_kwargs(self) -> dict[str, Any]:
        return {}

    @property
    def top_logprobs_wanted(self) -> int | None:
        """How many alternatives a response lists per token (None: no logprobs in the response)."""
        return None


class CompletionRequest(SamplingRequest):
    prompt: NonEmptyStr | PromptList[NonEmptyStr] | TokenIds | PromptList[TokenIds]
    max_tokens: MaxTokens | None = 16
    best_of: Annotated[Literal[1], _unsupported(1), _INTEGRAL] | None = None
    echo: bool = False
    logprobs: Logprobs | None = None
    suffix: Annotated[str, Field(max_length=0), _unsupported("")] | None = None

    def logprob_kwargs(self) -> dict[str, Any]:
        """``echo`` with ``logprobs`` also returns the prompt's (lm-eval's loglikelihood asks so)."""
        return {"logprobs": self.logprobs, "prompt_logprobs": self.logprobs if self.echo else None}

    @property
    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = STRICT
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_input(self) -> dict[str, Any]:
        """What chat templates expect: content as one string."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name:
            message["name"] = self.name
        return message


class ResponseFormat(BaseModel):
    model_config = STRICT
    type: Annotated[Literal["text"], _unsupported("text")] = "text"


def _chat_schema(schema: dict[str, Any]) -> None:
    _null_means_default(schema)
    # top_logprobs (an integer, not null) asks for logprobs: true
    schema["if"] = {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer"}}}
    schema["then"] = {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}


class ChatCompletionRequest(SamplingRequest):
    model_config = ConfigDict(json_schema_extra=_chat_schema)
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: MaxTokens | None = None
    max_tokens: MaxTokens | None = None  # deprecated by OpenAI in favour of max_completion_tokens; still sent
    logprobs: bool = False
    top_logprobs: Logprobs | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=0), _unsupported([])] | None = None
    response_format: ResponseFormat | None = None

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
        return {"logprobs": (self.top_logprobs or 0) if self.logprobs else None}

    @property
    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(BaseModel):
    """Exactly one of ``prompt`` and ``messages`` (``null`` counts as absent)."""

    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra={"oneOf": [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}}}]})
    model: ModelName | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool = True

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
