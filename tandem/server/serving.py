"""Completions and chat completions: from a validated body to engine requests (one per choice), and
from their outputs to a JSON response or an event stream.

Everything that can be wrong with a request is found here, before anything is queued: a bad
request fails alone with a 400 and never reaches the engine core. The order bounds what a request
costs: its counts (prompts x n) are checked against the per-request limits and the server's capacity
first (400 / 429), and only then are its prompts tokenized and its choices built, on a worker thread
when they are large (``Offload``), so the event loop keeps serving other clients meanwhile."""
from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from tandem.engine.sequence import EngineRequest
from tandem.sampling_params import SamplingParams
from tandem.server.client import EngineClient, RequestFailed, RequestHandle
from tandem.server.errors import APIError, bad_request, error_body
from tandem.engine.fanout import fan_out
from tandem.server.offload import Offload
from tandem.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest
from tandem.server.request_limits import RequestLimits
from tandem.server.responses import (DONE, ResponseMeta, chunk, full_response, json_bytes, logprobs_of, prompt_text,
                                     sse, usage_chunk)
from tandem.server.streaming import SSEResponse, unless_disconnected
from tandem.server.tokenizing import chat_ids, encode_text


@dataclass
class Prompt:
    text: str | None  # None for token-id prompts and chat (the text is not what the model reads)
    token_ids: list[int]


@dataclass
class Prepared:
    """A request's engine requests (choice i is ``requests[i]``), ready for ``EngineClient.submit``."""

    requests: list[EngineRequest]
    texts: list[str | None]  # each choice's prompt text
    prompt_tokens: int  # once per prompt, whatever n is


class Serving:
    def __init__(self, client: EngineClient, served_names: list[str], limits: RequestLimits | None = None,
                 offload: Offload | None = None) -> None:
        self.client = client
        self.served_names = served_names
        self.limits = limits or RequestLimits()
        self.offload = offload or Offload()

    # --- routes ------------------------------------------------------------------------------
    async def completion(self, body: CompletionRequest, raw: Request) -> Response:
        meta = self.meta("completion", body, echo=body.echo)
        params = self.sampling_params(body, body.max_tokens)
        items = prompt_items(body.prompt)
        self.admit(len(items), body.n)
        prepared = await self.offload.run(self.prepare, meta.id, items, params, body.n,
                                          size=sum(map(len, items)) * body.n)
        return await self.generate(meta, body, prepared, raw)

    async def chat(self, body: ChatCompletionRequest, raw: Request) -> Response:
        meta = self.meta("chat", body)
        params = self.sampling_params(body, body.requested_max_tokens)
        self.admit(1, body.n)
        if self.client.tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so no chat template: use /v1/completions "
                                "with token ids", "messages")
        messages = [m.as_template_input() for m in body.messages]
        prepared = await self.offload.run(self.prepare_chat, meta.id, messages, params, body.n,
                                          size=sum(len(m["content"]) for m in messages) * body.n)
        return await self.generate(meta, body, prepared, raw)

    # --- checks and inputs ---------------------------------------------------------------------
    def meta(self, kind: str, body: SamplingRequest, echo: bool = False) -> ResponseMeta:
        return ResponseMeta(kind, self.model_name(body.model), top_logprobs=body.top_logprobs_wanted, echo=echo,
                            token_text=self.client.output_processor.logprob_decoder.token_text,
                            decode=self.client.decode)

    def model_name(self, requested: str | None) -> str:
        if requested is None or requested in self.served_names:
            return requested or self.served_names[0]
        raise APIError(404, f"the model {requested!r} does not exist; this server serves "
                            f"{', '.join(map(repr, self.served_names))}", "model", "model_not_found")

    def sampling_params(self, body: SamplingRequest, max_tokens: int | None) -> SamplingParams:
        """SamplingParams checks every field's type and range; its ValueError names the field."""
        try:
            return SamplingParams(max_tokens=max_tokens, **body.sampling_kwargs())
        except ValueError as exc:
            raise bad_request(exc) from exc

    def admit(self, prompts: int, n: int) -> None:
        """Before any per-prompt or per-choice work: 400 over a per-request limit, 429 over capacity
        (``submit`` checks capacity again once the work is done: other requests came in meanwhile)."""
        self.client._admit(self.limits.sequences(prompts, n, self.capacity()))  # noqa: SLF001 - submit's own rule

    def capacity(self) -> int | None:
        """The most engine requests the server holds at once (None: no --max-num-waiting)."""
        waiting = self.client.max_num_waiting
        return None if waiting is None else self.client.info.max_num_seqs + waiting

    # --- preparation: on a worker thread when large (reads the client, changes nothing) ----------
    def prepare(self, request_id: str, items: list[str | list[int]], params: SamplingParams, n: int) -> Prepared:
        return self.prepared(request_id, [self._encode(p) for p in items], params, n, "prompt")

    def prepare_chat(self, request_id: str, messages: list[dict[str, Any]], params: SamplingParams,
                     n: int) -> Prepared:
        try:
            ids = chat_ids(self.client.tokenizer, messages)
        except Exception as exc:  # noqa: BLE001 - a template raises what it likes on bad conversations
            raise APIError(400, f"the chat template could not render these messages: {exc}", "messages") from exc
        return self.prepared(request_id, [self._encode(ids, "messages")], params, n, "messages")

    def prepared(self, request_id: str, prompts: list[Prompt], params: SamplingParams, n: int,
                 param: str) -> Prepared:
        requests, texts = self.engine_requests(request_id, prompts, params, n, param)
        return Prepared(requests, texts, sum(len(p.token_ids) for p in prompts))

    def _encode(self, prompt: str | list[int], param: str = "prompt") -> Prompt:
        text, ids = (prompt, None) if isinstance(prompt, str) else (None, prompt)
        if text is not None and self.client.tokenizer is not None:
            ids = encode_text(self.client.tokenizer, text)
        if ids is not None and len(ids) >= self.client.max_model_len:
            raise self.context_error(len(ids), 0, param)
        try:
            return Prompt(text, self.client.processor.encode_prompt(text, ids))
        except ValueError as exc:
            raise bad_request(exc, param) from exc

    def context_error(self, used: int, wanted: int, param: str) -> APIError:
        return APIError(400, f"this model's maximum context length is {self.client.max_model_len} tokens, but "
                             f"the request has {used} prompt tokens and asks for {wanted} completion tokens; "
                             "shorten the prompt or lower max_tokens", param, "context_length_exceeded")

    def prompt_params(self, prompt: Prompt, params: SamplingParams) -> SamplingParams:
        """``params`` for this prompt: checked against the context, and with the default max_tokens
        (--default-max-tokens, or the rest of the context) when the request named none."""
        used, wanted = len(prompt.token_ids), params.max_tokens or 0
        if used + wanted > self.client.max_model_len:
            raise self.context_error(used, wanted, "max_tokens")
        if params.max_tokens is not None or self.limits.default_max_tokens is None:
            return params  # the engine gives a request without max_tokens the rest of the context itself
        try:
            return dataclasses.replace(params, max_tokens=self.limits.max_tokens(self.client.max_model_len - used))
        except ValueError as exc:  # min_tokens above the default, say
            raise bad_request(exc, "max_tokens") from exc

    def engine_requests(self, request_id: str, prompts: list[Prompt], params: SamplingParams, n: int,
                        param: str) -> tuple[list[EngineRequest], list[str | None]]:
        """Choice k = prompt k // n, sample k % n (vLLM's order)."""
        requests, texts = [], []
        for p_index, prompt in enumerate(prompts):
            for child, child_params in fan_out(f"{request_id}-{p_index}", self.prompt_params(prompt, params), n):
                try:
                    requests.append(self.client.processor.process(child, None, child_params, prompt.token_ids))
                except ValueError as exc:
                    raise bad_request(exc, param) from exc
                texts.append(prompt.text)
        return requests, texts

    # --- running -----------------------------------------------------------------------------
    async def generate(self, meta: ResponseMeta, body: SamplingRequest, prepared: Prepared,
                       raw: Request) -> Response:
        handle = self.client.submit(prepared.requests, prepared.texts, stream=body.stream)
        prompt_tokens = prepared.prompt_tokens
        if body.stream:
            return SSEResponse(_events(meta, handle, prompt_tokens, body.include_usage), handle.close)
        try:
            finished, outputs = await unless_disconnected(raw, handle.result())
        except RequestFailed as exc:
            raise APIError(exc.status, exc.message) from exc
        finally:
            handle.close()
        if not finished:
            return Response(status_code=499)  # nobody reads it: the client is gone
        return Response(json_bytes(full_response(meta, outputs, prompt_tokens)), media_type="application/json")


async def _events(meta: ResponseMeta, handle: RequestHandle, prompt_tokens: int,
                  include_usage: bool) -> AsyncIterator[bytes]:
    """The stream of one response: deltas of each choice's text (a streamed text only ever grows, so
    the deltas add up to the final text), the usage chunk if asked for, then [DONE]; an error event
    instead if the request fails on the way."""
    sent = [0] * len(handle.engine_ids)  # characters of each choice's text sent so far
    tokens = [0] * len(handle.engine_ids)  # tokens whose logprobs were sent
    started = [False] * len(handle.engine_ids)
    try:
        if meta.kind == "chat":
            yield b"".join(sse(chunk(meta, i, "", None, role=True)) for i in range(len(sent)))
        async for updates in handle.updates():
            frames = []
            for index, output in updates:
                completion = output.outputs[0]
                delta, sent[index] = completion.text[sent[index]:], len(completion.text)
                echo = meta.echo and not started[index]  # the prompt leads the first chunk
                prefix = prompt_text(meta, output) if echo else ""
                if prefix or delta or completion.finish_reason is not None:
                    # the logprobs of every token since the last frame (text held back included)
                    logprobs = logprobs_of(meta, output, tokens[index], len(completion.token_ids), echo)
                    started[index], tokens[index] = True, len(completion.token_ids)
                    frames.append(sse(chunk(meta, index, prefix + delta, completion.finish_reason,
                                            logprobs=logprobs)))
            if frames:
                yield b"".join(frames)
        if include_usage:
            yield sse(usage_chunk(meta, prompt_tokens, handle.outputs))
    except RequestFailed as exc:
        yield sse(error_body(exc.status, exc.message))
    finally:
        handle.close()
    yield DONE


def prompt_items(prompt: str | list) -> list[str | list[int]]:
    """The prompts of a completions request, as given (counted before any is tokenized)."""
    if isinstance(prompt, str):
        items: list = [prompt]
    elif prompt and isinstance(prompt[0], int):
        items = [prompt]  # one prompt of token ids
    else:
        items = list(prompt)
    if not items:
        raise APIError(400, "prompt must not be an empty list", "prompt")
    return items
