"""The event stream of one response: each choice's deltas (a streamed text only ever grows, so the
deltas add up to the final text), the usage chunk if asked for, then ``[DONE]``; an error event
instead if the request fails on the way.

What a plain response holds arrives in the stream too: ``stop_reason`` with the finish, the
prompt's extras (``prompt_logprobs``, ``prompt_token_ids``) with a choice's first chunk (in the
choice for completions, beside it for chat, as vLLM places them), each chunk's new ``token_ids``,
and with ``continuous_usage_stats`` the usage so far in every chunk."""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from tandem.outputs import RequestOutput
from tandem.server.client import RequestFailed, RequestHandle
from tandem.server.errors import error_body
from tandem.server.responses import (DONE, ChoiceStream, ResponseMeta, chunk, finish_of, logprobs_of, opening_chunk,
                                     prompt_extras, prompt_text, sse, usage, usage_chunk)


@dataclass
class _Choice:
    """What one choice has sent so far."""

    chars: int = 0  # of its text
    tokens: int = 0  # tokens whose logprobs (and ids) were sent
    started: bool = False
    reader: ChoiceStream | None = field(default=None)  # chat: tool calls and reasoning

    def frame(self, meta: ResponseMeta, index: int, output: RequestOutput) -> dict[str, Any] | None:
        completion = output.outputs[0]
        text = "" if meta.score_only else completion.text
        delta, self.chars = text[self.chars:], len(text)
        reason, stop_reason = finish_of(meta, output)
        first = not self.started
        echo = meta.kind == "completion" and meta.echo and first  # the prompt leads the first chunk
        body: str | dict[str, Any] = (prompt_text(meta, output) if echo else "") + delta
        if self.reader is not None:  # it reads the echoed text too (opening_chunk left it out)
            body = self.reader.feed((meta.chat_echo if first else "") + delta, reason is not None)
            reason = self.reader.finish_reason(reason)
        if not body and reason is None:
            return None
        # the logprobs (and ids) of every token since the last frame (text held back included)
        end = 0 if meta.score_only else len(completion.token_ids)
        extra: dict[str, Any] = {} if reason is None else {"stop_reason": stop_reason}
        if meta.token_ids:
            extra["token_ids"] = list(completion.token_ids[self.tokens:end])
        outer = prompt_extras(meta, output) if first else {}
        if meta.kind == "completion":
            extra, outer = {**extra, **outer}, {}
        frame = chunk(meta, index, body, reason, logprobs_of(meta, output, self.tokens, end, echo), **extra)
        self.started, self.tokens = True, end
        return {**frame, **outer}


async def events(meta: ResponseMeta, handle: RequestHandle, prompt_tokens: int,
                 include_usage: bool) -> AsyncIterator[bytes]:
    choices = [_Choice(reader=None if meta.chat_output is None else meta.chat_output.stream())
               for _ in handle.engine_ids]
    try:
        if meta.kind == "chat":
            yield b"".join(sse(opening_chunk(meta, i)) for i in range(len(choices)))
        async for updates in handle.updates():
            frames = []
            for index, output in updates:
                frame = choices[index].frame(meta, index, output)
                if frame is not None:
                    if meta.continuous_usage:
                        frame["usage"] = usage(meta, prompt_tokens, handle.outputs)
                    frames.append(sse(frame))
            if frames:
                yield b"".join(frames)
        if include_usage:
            yield sse(usage_chunk(meta, prompt_tokens, handle.outputs))
    except RequestFailed as exc:
        yield sse(error_body(exc.status, exc.message))
    finally:
        handle.close()
    yield DONE
