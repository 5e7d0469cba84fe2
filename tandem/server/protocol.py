"""Request bodies of the OpenAI-compatible routes (pydantic: FastAPI validates them, and a type
error becomes a 400 naming the field). Ranges are checked where the engine checks them
(``SamplingParams``: logprobs up to 20, penalties, logit bias values), so the server and the offline
API accept the same values.

Unknown fields are ignored, as vLLM does: clients (LangChain, lm-eval) send fields of their own.
Known fields that we do not implement are refused with a 400 naming them unless they hold their
neutral value (``unsupported_fields``)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator

from tandem.sampling_params import SEED_MAX, SEED_MIN


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The fields completions and chat share."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    n: int = Field(1, ge=1, le=1024)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    min_tokens: int | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """Clients (LangChain...) send ``null`` for fields they leave unset: the default applies.
        Not for ``max_tokens``, where null means "up to the context" (as in vLLM)."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k == "max_tokens"}
        return data

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_kwargs(self) -> dict[str, Any]:
        """SamplingParams keywords (None = the default), without max_tokens. Raises ValueError
        naming the field for what SamplingParams cannot check (logit_bias keys are strings here)."""
        values = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                      seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
                      ignore_eos=self.ignore_eos, include_stop_str_in_output=self.include_stop_str_in_output,
                      skip_special_tokens=self.skip_special_tokens, presence_penalty=self.presence_penalty,
                      frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
                      min_tokens=self.min_tokens, logit_bias=self._logit_bias(), **self.logprob_kwargs())
        return {k: v for k, v in values.items() if v is not None}

    def _logit_bias(self) -> dict[int, float] | None:
        if self.logit_bias is None:
            return None
        try:
            return {int(token): value for token, value in self.logit_bias.items()}
        except ValueError:
            raise ValueError("SamplingParams.logit_bias keys must be token ids (integers as strings), got "
                             f"{list(self.logit_bias)[:5]!r}") from None

    def logprob_kwargs(self) -> dict[str, Any]:
        return {}

    @property
    def top_logprobs_wanted(self) -> int | None:
        """How many alternatives a response lists per token (None: no logprobs in the response)."""
        return None

    def unsupported_fields(self) -> list[str]:
        return []


TokenIds = list[StrictInt]


class CompletionRequest(SamplingRequest):
    prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
    max_tokens: int | None = 16
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    def logprob_kwargs(self) -> dict[str, Any]:
        """``echo`` with ``logprobs`` also returns the prompt's (lm-eval's loglikelihood asks so)."""
        return {"logprobs": self.logprobs, "prompt_logprobs": self.logprobs if self.echo else None}

    @property
    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs

    def unsupported_fields(self) -> list[str]:
        bad = super().unsupported_fields()
        if self.best_of not in (None, 1):
            bad.append("best_of")
        if self.suffix:
            bad.append("suffix")
        return bad


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: StrictStr
    content: StrictStr | list[TextPart] | None = None
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
    model_config = ConfigDict(extra="ignore")
    type: str = "text"


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens; still sent
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: ResponseFormat | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprob_kwargs(self) -> dict[str, Any]:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("SamplingParams.logprobs: top_logprobs needs logprobs: true")
        return {"logprobs": (self.top_logprobs or 0) if self.logprobs else None}

    @property
    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def unsupported_fields(self) -> list[str]:
        bad = super().unsupported_fields()
        if self.tools:
            bad.append("tools")
        if self.response_format is not None and self.response_format.type != "text":
            bad.append("response_format")
        return bad


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: TokenIds
