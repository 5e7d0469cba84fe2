"""Completions and chat completions: from a validated body to engine requests (one per choice), and
from their outputs to a JSON response or an event stream.

Everything that can be wrong with a request is found here, before anything is queued: a bad
request fails alone with a 400 and never reaches the engine core."""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from tandem.engine.sequence import EngineRequest
from tandem.sampling_params import SamplingParams
from tandem.server.client import EngineClient, RequestFailed, RequestHandle
from tandem.server.errors import APIError, bad_request, error_body
from tandem.engine.fanout import fan_out
from tandem.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest
from tandem.server.responses import (DONE, ResponseMeta, chunk, full_response, json_bytes, logprobs_of, prompt_text,
                                     sse, usage_chunk)
from tandem.server.streaming import SSEResponse, unless_disconnected


@dataclass
class Prompt:
    text: str | None  # None for token-id prompts and chat (the text is not what the model reads)
    token_ids: list[int]


class Serving:
    def __init__(self, client: EngineClient, served_names: list[str]) -> None:
        self.client = client
        self.served_names = served_names

    # --- routes ------------------------------------------------------------------------------
    async def completion(self, body: CompletionRequest, raw: Request) -> Response:
        meta = self.meta("completion", body, echo=body.echo)
        _refuse_unsupported(body)
        params = self.sampling_params(body, body.max_tokens)
        prompts = self.completion_prompts(body.prompt)
        return await self.generate(meta, body, params, prompts, raw, "prompt")

    async def chat(self, body: ChatCompletionRequest, raw: Request) -> Response:
        meta = self.meta("chat", body)
        _refuse_unsupported(body)
        params = self.sampling_params(body, body.requested_max_tokens)
        return await self.generate(meta, body, params, [self.chat_prompt(body)], raw, "messages")

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

    def completion_prompts(self, prompt: str | list) -> list[Prompt]:
        if isinstance(prompt, str):
            items: list = [prompt]
        elif prompt and isinstance(prompt[0], int):
            items = [prompt]  # one prompt of token ids
        else:
            items = list(prompt)
        if not items:
            raise APIError(400, "prompt must not be an empty list", "prompt")
        return [self._encode(p) for p in items]

    def _encode(self, prompt: str | list[int], param: str = "prompt") -> Prompt:
        text, ids = (prompt, None) if isinstance(prompt, str) else (None, prompt)
        if text is not None and self.client.tokenizer is not None:
            ids = self.client.tokenizer.encode(text)
        if ids is not None and len(ids) >= self.client.max_model_len:
            raise self.context_error(len(ids), 0, param)
        try:
            return Prompt(text, self.client.processor.encode_prompt(text, ids))
        except ValueError as exc:
            raise bad_request(exc, param) from exc

    def chat_prompt(self, body: ChatCompletionRequest) -> Prompt:
        if self.client.tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so no chat template: use /v1/completions "
                                "with token ids", "messages")
        messages = [m.as_template_input() for m in body.messages]
        try:
            ids = self.client.tokenizer.apply_chat_template(messages)
        except Exception as exc:  # noqa: BLE001 - a template raises what it likes on bad conversations
            raise APIError(400, f"the chat template could not render these messages: {exc}", "messages") from exc
        return self._encode(ids, "messages")

    def context_error(self, used: int, wanted: int, param: str) -> APIError:
        return APIError(400, f"this model's maximum context length is {self.client.max_model_len} tokens, but "
                             f"the request has {used} prompt tokens and asks for {wanted} completion tokens; "
                             "shorten the prompt or lower max_tokens", param, "context_length_exceeded")

    def check_context(self, prompt: Prompt, params: SamplingParams) -> None:
        used, wanted = len(prompt.token_ids), params.max_tokens or 0
        if used + wanted > self.client.max_model_len:
            raise self.context_error(used, wanted, "max_tokens")

    def engine_requests(self, request_id: str, prompts: list[Prompt], params: SamplingParams, n: int,
                        param: str) -> tuple[list[EngineRequest], list[str | None]]:
        """Choice k = prompt k // n, sample k % n (vLLM's order)."""
        requests, texts = [], []
        for p_index, prompt in enumerate(prompts):
            self.check_context(prompt, params)
            for child, child_params in fan_out(f"{request_id}-{p_index}", params, n):
                try:
                    requests.append(self.client.processor.process(child, None, child_params, prompt.token_ids))
                except ValueError as exc:
                    raise bad_request(exc, param) from exc
                texts.append(prompt.text)
        return requests, texts

    # --- running -----------------------------------------------------------------------------
    async def generate(self, meta: ResponseMeta, body: SamplingRequest, params: SamplingParams,
                       prompts: list[Prompt], raw: Request, param: str) -> Response:
        requests, texts = self.engine_requests(meta.id, prompts, params, body.n, param)
        prompt_tokens = sum(len(p.token_ids) for p in prompts)  # once per prompt, whatever n is
        handle = self.client.submit(requests, texts, stream=body.stream)
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


def _refuse_unsupported(body: SamplingRequest) -> None:
    bad = body.unsupported_fields()
    if bad:
        raise APIError(400, f"{', '.join(bad)}: not supported by this server", bad[0])
