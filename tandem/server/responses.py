"""Response bodies in OpenAI's shapes (with vLLM's additions), built as plain dicts and encoded with
msgspec: a streamed chunk is built and encoded per update of every request, so this path stays cheap
(no model objects).

vLLM's additions: ``stop_reason`` in every choice (the stop string or stop token id that ended it,
null otherwise), ``prompt_logprobs``, ``token_ids`` / ``prompt_token_ids`` (``return_token_ids``)
and ``prompt_text`` (chat, ``return_prompt_text``). A chat choice's message comes from
``ResponseMeta.chat_output`` when set (tool calls, reasoning: their parsers read the text)."""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from tandem.outputs import RequestOutput
from tandem.server.logprobs_format import chat_logprobs, completion_logprobs, prompt_logprobs_list

_encode = msgspec.json.Encoder().encode
DONE = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + _encode(payload) + b"\n\n"


def json_bytes(payload: dict[str, Any]) -> bytes:
    return _encode(payload)


class ChoiceStream(Protocol):
    def feed(self, text: str, final: bool) -> dict[str, Any]: ...
    def finish_reason(self, reason: str | None) -> str | None: ...


class ChatOutputReader(Protocol):
    """How a chat choice's text becomes its message (``tandem.server.chat_output.ChatOutput``)."""

    def message(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]: ...
    def stream(self) -> ChoiceStream: ...


@dataclass
class ResponseMeta:
    """What every chunk of one response repeats, and what the request asked its body to hold."""

    kind: str  # "completion" | "chat"
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    top_logprobs: int | None = None  # alternatives listed per token; None: no logprobs in the response
    echo: bool = False  # completions: the prompt's text (and logprobs) come first
    token_text: Callable[[int], str] = str  # a token as logprobs name it (decoded alone, or "token_id:<id>")
    decode: Callable[[list[int]], str] = str  # the text of token ids (an echoed token-id prompt)
    role: str = "assistant"  # chat: the role of the message written
    chat_echo: str = ""  # chat echo: the last message's text, which the written message continues
    prompt_logprobs: int | None = None  # vLLM's prompt_logprobs: alternatives per prompt token
    token_ids: bool = False  # return_token_ids
    score_only: bool = False  # max_tokens 0 (with echo): the one token generated is not shown
    continuous_usage: bool = False  # every streamed chunk carries the usage so far
    prompt_text: str | None = None  # chat, return_prompt_text: the rendered prompt
    chat_output: ChatOutputReader | None = None  # tool calls and reasoning read the chat text

    def __post_init__(self) -> None:
        prefix = "cmpl-" if self.kind == "completion" else "chatcmpl-"
        self.id = prefix + (self.id or uuid.uuid4().hex)

    @property
    def object(self) -> str:
        return "text_completion" if self.kind == "completion" else "chat.completion"

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


def generated(meta: ResponseMeta, output: RequestOutput) -> int:
    """Tokens the response counts as generated (none when only scoring the prompt)."""
    return 0 if meta.score_only else len(output.outputs[0].token_ids)


def usage(meta: ResponseMeta, prompt_tokens: int, outputs: list[RequestOutput | None]) -> dict[str, int]:
    """The prompt counts once however many choices were sampled from it."""
    completion = sum(generated(meta, o) for o in outputs if o is not None)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def prompt_text(meta: ResponseMeta, output: RequestOutput) -> str:
    return output.prompt if output.prompt is not None else meta.decode(output.prompt_token_ids)


def logprobs_of(meta: ResponseMeta, output: RequestOutput, start: int, stop: int | None = None,
                with_prompt: bool = False, offset: int = 0) -> dict[str, Any] | None:
    """The response's logprobs for the completion's tokens [start, stop), with the prompt's first
    when echoed (completions only); none of the generated ones when only scoring."""
    completion = output.outputs[0]
    if meta.top_logprobs is None or completion.logprobs is None:
        return None
    if meta.score_only:
        start = stop = 0
    tokens, entries = completion.token_ids[start:stop], completion.logprobs[start:stop]
    if meta.kind == "chat":
        return chat_logprobs(tokens, entries, meta.top_logprobs, meta.token_text)
    if with_prompt and output.prompt_logprobs is not None:
        tokens, entries = output.prompt_token_ids + tokens, output.prompt_logprobs + entries
    return completion_logprobs(tokens, entries, meta.top_logprobs, meta.token_text, offset)


def finish_of(meta: ResponseMeta, output: RequestOutput) -> tuple[str | None, int | str | None]:
    """(finish_reason, stop_reason)."""
    completion = output.outputs[0]
    if meta.score_only and completion.finish_reason is not None:
        return "length", None
    return completion.finish_reason, completion.stop_reason


def prompt_extras(meta: ResponseMeta, output: RequestOutput) -> dict[str, Any]:
    """What the prompt adds to a body, as asked: its logprobs and token ids."""
    extras: dict[str, Any] = {}
    if meta.prompt_logprobs is not None and output.prompt_logprobs is not None:
        extras["prompt_logprobs"] = prompt_logprobs_list(output.prompt_token_ids, output.prompt_logprobs,
                                                         meta.prompt_logprobs, meta.token_text)
    if meta.token_ids:
        extras["prompt_token_ids"] = list(output.prompt_token_ids)
    return extras


def chat_message(meta: ResponseMeta, text: str, reason: str | None) -> tuple[dict[str, Any], str | None]:
    if meta.chat_output is not None:
        return meta.chat_output.message(meta.chat_echo + text, reason)
    return {"role": meta.role, "content": meta.chat_echo + text}, reason


def _choice(meta: ResponseMeta, index: int, output: RequestOutput) -> dict[str, Any]:
    completion = output.outputs[0]
    reason, stop_reason = finish_of(meta, output)
    shown = "" if meta.score_only else completion.text
    if meta.kind == "completion":
        text = (prompt_text(meta, output) if meta.echo else "") + shown
        choice = {"index": index, "text": text, "logprobs": logprobs_of(meta, output, 0, with_prompt=meta.echo),
                  "finish_reason": reason, "stop_reason": stop_reason, **prompt_extras(meta, output)}
    else:
        message, reason = chat_message(meta, shown, reason)
        choice = {"index": index, "message": message, "logprobs": logprobs_of(meta, output, 0),
                  "finish_reason": reason, "stop_reason": stop_reason}
    if meta.token_ids:
        choice["token_ids"] = [] if meta.score_only else list(completion.token_ids)
    return choice


def full_response(meta: ResponseMeta, outputs: list[RequestOutput], prompt_tokens: int) -> dict[str, Any]:
    choices = [_choice(meta, i, o) for i, o in enumerate(outputs)]
    body = {**meta.head(meta.object), "choices": choices, "usage": usage(meta, prompt_tokens, outputs)}
    if meta.kind == "chat":  # one prompt: its extras once, beside the choices (vLLM's place)
        body.update(prompt_extras(meta, outputs[0]))
        if meta.prompt_text is not None:
            body["prompt_text"] = meta.prompt_text
    return body


def chunk(meta: ResponseMeta, index: int, delta: str | dict[str, Any], finish_reason: str | None,
          logprobs: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """One streamed delta of one choice: text for completions, a delta dict (or its content) for
    chat; ``extra`` goes into the choice (``stop_reason``, ``token_ids``, ...)."""
    if meta.kind == "completion":
        choice = {"index": index, "text": delta, "logprobs": logprobs, "finish_reason": finish_reason, **extra}
        return {**meta.head("text_completion"), "choices": [choice]}
    if isinstance(delta, str):
        delta = {"content": delta} if delta else {}
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason, **extra}
    return {**meta.head("chat.completion.chunk"), "choices": [choice]}


def opening_chunk(meta: ResponseMeta, index: int) -> dict[str, Any]:
    """A chat stream's first chunk for a choice: the role (and an echoed message's text, unless a
    chat-output reader is to read it first)."""
    return chunk(meta, index, {"role": meta.role, "content": "" if meta.chat_output else meta.chat_echo}, None)


def usage_chunk(meta: ResponseMeta, prompt_tokens: int, outputs: list[RequestOutput | None]) -> dict[str, Any]:
    obj = "text_completion" if meta.kind == "completion" else "chat.completion.chunk"
    return {**meta.head(obj), "choices": [], "usage": usage(meta, prompt_tokens, outputs)}
