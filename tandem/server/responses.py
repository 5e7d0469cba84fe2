"""Response bodies in OpenAI's shapes, built as plain dicts and encoded with msgspec: a streamed
chunk is built and encoded per update of every request, so this path stays cheap (no model objects)."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgspec

from tandem.outputs import RequestOutput

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


def _choice(meta: ResponseMeta, index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    if meta.kind == "completion":
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish_reason}


def full_response(meta: ResponseMeta, outputs: list[RequestOutput], prompt_tokens: int) -> dict[str, Any]:
    choices = [_choice(meta, i, o.outputs[0].text, o.outputs[0].finish_reason) for i, o in enumerate(outputs)]
    return {**meta.head(meta.object), "choices": choices, "usage": usage(prompt_tokens, outputs)}


def chunk(meta: ResponseMeta, index: int, text: str, finish_reason: str | None,
          role: bool = False) -> dict[str, Any]:
    """One streamed delta of one choice; ``role`` marks the chat stream's opening chunk."""
    if meta.kind == "completion":
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**meta.head("text_completion"), "choices": [choice]}
    delta: dict[str, Any] = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {**meta.head("chat.completion.chunk"), "choices": [choice]}


def usage_chunk(meta: ResponseMeta, prompt_tokens: int, outputs: list[RequestOutput]) -> dict[str, Any]:
    obj = "text_completion" if meta.kind == "completion" else "chat.completion.chunk"
    return {**meta.head(obj), "choices": [], "usage": usage(prompt_tokens, outputs)}
