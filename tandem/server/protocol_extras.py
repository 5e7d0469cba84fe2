"""Request fields of OpenAI's and vLLM's schemas that this server knows and does not implement, and
those that change nothing by their definition.

Refused fields take only their neutral value (the default, or what the server does anyway): any
other value is a 400 naming the field, so no client is told yes and then ignored. ``null`` means the
default, as everywhere. Informational fields (``user``, ``metadata``, ...) are accepted: they tag a
request for the caller's own bookkeeping and ask nothing of the generation."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from tandem.server.protocol_types import INTEGRAL, OnlyFalse, OnlyTrue, refused, refused_any

Null = Annotated[None, refused_any()]  # the only value accepted is null
EmptyDict = Annotated[dict[str, Any], Field(max_length=0), refused({})]
EmptyList = Annotated[list[Any], Field(max_length=0), refused([])]
Zero = Annotated[int, Field(ge=0, le=0), refused(0), INTEGRAL]


class InformationalFields(BaseModel):
    """Tags for the caller: OpenAI's ``user``, ``safety_identifier``, ``metadata`` and
    ``prompt_cache_key`` (prefix caching here is automatic, keyed by the prompt itself), vLLM's
    ``session_id``."""

    user: str | None = None
    safety_identifier: str | None = None
    metadata: dict[str, str] | None = None
    prompt_cache_key: str | None = None
    session_id: str | None = None


class RefusedVLLMFields(BaseModel):
    """vLLM's request fields that completions and chat share and this server does not implement."""

    use_beam_search: OnlyFalse | None = None
    length_penalty: Annotated[float, Field(ge=1.0, le=1.0), refused(1.0, 1)] | None = None
    spaces_between_special_tokens: OnlyTrue | None = None  # the tokenizer's own spacing
    logits_processors: Null = None
    logprob_token_ids: Null = None
    priority: Zero | None = None  # no priority scheduling: every request is 0
    cache_salt: Null = None
    kv_transfer_params: Null = None
    ec_transfer_params: Null = None
    vllm_xargs: EmptyDict | None = None
    watermarking: OnlyFalse | None = None
    repetition_detection: Null = None
    max_repetition_pattern_size: Zero | None = None
    min_repetition_pattern_size: Zero | None = None
    repetition_min_count: Zero | None = None
    routed_experts_prompt_start: Zero | None = None
    stream_interval: Annotated[int, Field(ge=1, le=1), refused(1), INTEGRAL] | None = None  # every update is sent


class RefusedCompletionFields(BaseModel):
    prompt_embeds: Null = None


class RefusedChatFields(BaseModel):
    """OpenAI's chat fields for features this server does not have (audio, web search, stored
    completions, predicted outputs, service tiers), vLLM's multimodal and render-only options, and
    the reasoning controls a reasoning parser does not give (an effort level, a thinking budget)."""

    audio: Null = None
    modalities: Annotated[list[Literal["text"]], Field(min_length=1, max_length=1)] | None = None
    moderation: Null = None
    prediction: Null = None
    prompt_cache_options: Null = None
    prompt_cache_retention: Null = None
    service_tier: Literal["auto", "default"] | None = None  # one tier here
    store: OnlyFalse | None = None
    verbosity: Null = None
    web_search_options: Null = None
    best_of: Annotated[Literal[1], refused(1), INTEGRAL] | None = None  # vLLM's older chat field
    functions: EmptyList | None = None  # OpenAI's older tools
    function_call: Annotated[Literal["none"], refused("none")] | None = None
    mm_processor_kwargs: EmptyDict | None = None
    media_io_kwargs: EmptyDict | None = None
    return_token_offsets: OnlyFalse | None = None  # vLLM's render endpoints only
    return_mm_kwargs: OnlyTrue | None = None
    # reasoning (point 4)
    reasoning_effort: Null = None
    thinking_token_budget: Null = None

