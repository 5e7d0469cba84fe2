"""Response bodies in OpenAI's shapes, built as plain dicts and encoded with msgspec: a streamed
chunk is built and encoded per update of every request, so this path stays cheap (no model objects)."""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from tandem.outputs import RequestOutput
from tandem.server.logprobs_format import chat_logprobs, completion_logprobs

_encode = msgspec.json.Encoder().encode
DONE = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + _encode(payload) + b"\n\n"


def json_bytes(payload: dict[str, Any]) -> bytes:
    return _encode(payload)


@dataclass
class ResponseMeta:
    """What every chunk of one response repeats."""

    kind: str  # "completion" | "chat"
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    top_logprobs: int | None = None  # alternatives listed per token; None: no logprobs in the response
    echo: bool = False  # completions: the prompt's text (and logprobs) come first
    token_text: Callable[[int], str] = str  # a token decoded alone (logprob entries)
    decode: Callable[[list[int]], str] = str  # the text of token ids (an echoed token-id prompt)

    def __post_init__(self) -> None:
        if not self.id:
            self.id = ("cmpl-" if self.kind == "completion" else "chatcmpl-") + uuid.uuid4().hex

    @property
    def object(self) -> str:
        return "text_completion" if self.kind == "completion" else "chat.completion"

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


def usage(prompt_tokens: int, outputs: list[RequestOutput]) -> dict[str, int]:
    """The prompt counts once however many choices were sampled from it."""
    completion = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def prompt_text(meta: ResponseMeta, output: RequestOutput) -> str:
    return output.prompt if output.prompt is not None else meta.decode(output.prompt_token_ids)


def logprobs_of(meta: ResponseMeta, output: RequestOutput, start: int, stop: int | None = None,
                with_prompt: bool = False, offset: int = 0) -> dict[str, Any] | None:
    """The response's logprobs for the completion's tokens [start, stop), with the prompt's first
    when echoed (completions only)."""
    completion = output.outputs[0]
    if meta.top_logprobs is None or completion.logprobs is None:
        return None
    tokens, entries = completion.token_ids[start:stop], completion.logprobs[start:stop]
    if meta.kind == "chat":
        return chat_logprobs(tokens, entries, meta.top_logprobs, meta.token_text)
    if with_prompt and output.prompt_logprobs is not None:
        tokens, entries = output.prompt_token_ids + tokens, output.prompt_logprobs + entries
    return completion_logprobs(tokens, entries, meta.top_logprobs, meta.token_text, offset)


def _choice(meta: ResponseMeta, index: int, output: RequestOutput) -> dict[str, Any]:
    completion = output.outputs[0]
    if meta.kind == "completion":
        text = (prompt_text(meta, output) if meta.echo else "") + completion.text
        return {"index": index, "text": text, "logprobs": logprobs_of(meta, output, 0, with_prompt=meta.echo),
                "finish_reason": completion.finish_reason}
    return {"index": index, "message": {"role": "assistant", "content": completion.text},
            "logprobs": logprobs_of(meta, output, 0), "finish_reason": completion.finish_reason}


def full_response(meta: ResponseMeta, outputs: list[RequestOutput], prompt_tokens: int) -> dict[str, Any]:
    choices = [_choice(meta, i, o) for i, o in enumerate(outputs)]
    return {**meta.head(meta.object), "choices": choices, "usage": usage(prompt_tokens, outputs)}


def chunk(meta: ResponseMeta, index: int, text: str, finish_reason: str | None,
          role: bool = False, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One streamed delta of one choice; ``role`` marks the chat stream's opening chunk."""
    if meta.kind == "completion":
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**meta.head("text_completion"), "choices": [choice]}
    delta: dict[str, Any] = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return {**meta.head("chat.completion.chunk"), "choices": [choice]}


def usage_chunk(meta: ResponseMeta, prompt_tokens: int, outputs: list[RequestOutput]) -> dict[str, Any]:
    obj = "text_completion" if meta.kind == "completion" else "chat.completion.chunk"
    return {**meta.head(obj), "choices": [], "usage": usage(prompt_tokens, outputs)}
