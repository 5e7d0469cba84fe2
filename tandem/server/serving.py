"""Completions and chat completions: from a validated body to engine requests (one per choice), and
from their outputs to a JSON response or an event stream.

Everything that can be wrong with a request is found here, before anything is queued: a bad
request fails alone with a 400 and never reaches the engine core. The order bounds what a request
costs: its counts (prompts x n) are checked against the per-request limits and the server's capacity
first (400 / 429), and only then are its output constraint parsed and its prompts tokenized and its
choices built, on a worker thread when they are large (``Offload``), so the event loop keeps serving
other clients meanwhile."""
from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from tandem.engine.fanout import fan_out
from tandem.engine.sequence import EngineRequest
from tandem.sampling_params import SamplingParams
from tandem.server import constraints
from tandem.server.chat_output import ChatOutput, ChatParsing, ChatRequestParsing
from tandem.server.constraints import Constraint
from tandem.server.client import EngineClient, RequestFailed
from tandem.server.errors import APIError, bad_request
from tandem.server.offload import Offload
from tandem.server.prompts import Shaping, chat_options, echoed, response_role, shaping
from tandem.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest
from tandem.server.request_limits import RequestLimits
from tandem.server.responses import ResponseMeta, full_response, json_bytes
from tandem.server.stream_events import events
from tandem.server.streaming import SSEResponse, unless_disconnected
from tandem.server.tokenizing import chat_prompt, encode_text
from tandem.tokenizer import ChatOptions


@dataclass
class Prompt:
    text: str | None  # None for token-id prompts, chat, and cut prompts (the text is not what the model reads)
    token_ids: list[int]


@dataclass
class Prepared:
    """A request's engine requests (choice i is ``requests[i]``), ready for ``EngineClient.submit``."""

    requests: list[EngineRequest]
    texts: list[str | None]  # each choice's prompt text
    prompt_tokens: int  # once per prompt, whatever n is
    prompt_text: str | None = None  # chat: the rendered template
    chat_output: ChatOutput | None = None  # chat: how its choices are read


class Serving:
    def __init__(self, client: EngineClient, served_names: list[str], limits: RequestLimits | None = None,
                 offload: Offload | None = None, chat_parsing: ChatParsing | None = None,
                 sampling_defaults: dict[str, Any] | None = None) -> None:
        self.client = client
        self.sampling_defaults = sampling_defaults or {}  # --generation-config: for fields a request leaves unset
        self.served_names = served_names
        self.limits = limits or RequestLimits()
        self.offload = offload or Offload()
        # tool calls and reasoning (``tandem.server.chat_output.ChatParsing``): how a chat choice's text is
        # read is set per request as ``ResponseMeta.chat_output``, which responses and streams honour
        self.chat_parsing = chat_parsing or ChatParsing()

    # --- routes ------------------------------------------------------------------------------
    async def completion(self, body: CompletionRequest, raw: Request) -> Response:
        score_only = body.max_tokens == 0  # echo scores the prompt: one token is generated and not shown
        if score_only and body.min_tokens:
            raise APIError(400, "min_tokens must be 0 when max_tokens is 0", "min_tokens")
        meta = self.meta("completion", body, echo=body.echo, score_only=score_only)
        constraint = constraints.requested_constraint(body)
        params = self.sampling_params(body, 1 if score_only else body.max_tokens, constraint)
        items = prompt_items(body.prompt)
        self.admit(len(items), body.n)
        prepared = await self.offload.run(self.prepare, items, shaping(body), params, body.n, constraint,
                                          size=(sum(map(len, items)) + _size(constraint)) * body.n)
        return await self.generate(meta, body, prepared, raw)

    async def chat(self, body: ChatCompletionRequest, raw: Request) -> Response:
        options = chat_options(body, self.limits.trust_request_chat_template)
        role = response_role(body.messages, options)
        meta = self.meta("chat", body, role=role, chat_echo=echoed(body, role))
        parsing = self.chat_parsing.request(body, constraints.requested_constraint(body))  # tools, reasoning
        constraint, options = parsing.constraint, dataclasses.replace(options, tools=parsing.tools)
        params = self.sampling_params(body, body.requested_max_tokens, constraint)
        self.admit(1, body.n)
        if self.client.tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so no chat template: use /v1/completions "
                                "with token ids", "messages")
        messages = [m.as_template_input() for m in body.messages]
        size = sum(len(m["content"]) for m in messages) + _size(constraint)
        if options.chat_template is not None:  # a request's own template: its cost is not its length
            size = max(size, self.offload.inline_size + 1)
        prepared = await self.offload.run(self.prepare_chat, messages, options, shaping(body), params, body.n,
                                          parsing, size=size * body.n)
        if body.return_prompt_text:
            meta.prompt_text = prepared.prompt_text
        meta.chat_output = prepared.chat_output
        return await self.generate(meta, body, prepared, raw)

    # --- checks and inputs ---------------------------------------------------------------------
    def meta(self, kind: str, body: SamplingRequest, **fields: Any) -> ResponseMeta:
        token_text = self.client.output_processor.logprob_decoder.token_text
        if body.return_tokens_as_token_ids:
            token_text = _token_id_text
        return ResponseMeta(kind, self.model_name(body.model), id=body.request_id or "",
                            top_logprobs=body.top_logprobs_wanted, token_text=token_text, decode=self.client.decode,
                            prompt_logprobs=body.prompt_logprobs, token_ids=bool(body.return_token_ids),
                            continuous_usage=body.continuous_usage, **fields)

    def model_name(self, requested: str | None) -> str:
        if requested is None or requested in self.served_names:
            return requested or self.served_names[0]
        raise APIError(404, f"the model {requested!r} does not exist; this server serves "
                            f"{', '.join(map(repr, self.served_names))}", "model", "model_not_found")

    def sampling_params(self, body: SamplingRequest, max_tokens: int | None,
                        constraint: Constraint | None) -> SamplingParams:
        """SamplingParams checks every field's type and range; its ValueError names the field."""
        kwargs = {**self.sampling_defaults, **body.sampling_kwargs()}
        if constraint is not None:
            kwargs.update(constraints.engine_kwargs(constraint))
        try:
            return SamplingParams(max_tokens=max_tokens, **kwargs)
        except ValueError as exc:
            raise _named(bad_request(exc), constraint) from exc

    def admit(self, prompts: int, n: int) -> None:
        """Before any per-prompt or per-choice work: 400 over a per-request limit, 429 over capacity
        (``submit`` checks capacity again once the work is done: other requests came in meanwhile)."""
        self.client._admit(self.limits.sequences(prompts, n, self.capacity()))  # noqa: SLF001 - submit's own rule

    def capacity(self) -> int | None:
        """The most engine requests the server holds at once (None: no --max-num-waiting)."""
        waiting = self.client.max_num_waiting
        return None if waiting is None else self.client.info.max_num_seqs + waiting

    # --- preparation: on a worker thread when large (reads the client, changes nothing) ----------
    def prepare(self, items: list[str | list[int]], shape: Shaping, params: SamplingParams, n: int,
                constraint: Constraint | None) -> Prepared:
        return self.prepared([self._encode(p, shape) for p in items], params, n, "prompt", constraint)

    def prepare_chat(self, messages: list[dict[str, Any]], options: ChatOptions, shape: Shaping,
                     params: SamplingParams, n: int, parsing: ChatRequestParsing) -> Prepared:
        try:
            text, ids = chat_prompt(self.client.tokenizer, messages, options, shape.add_special_tokens)
        except Exception as exc:  # noqa: BLE001 - a template raises what it likes on bad conversations
            raise APIError(400, f"the chat template could not render these messages: {exc}", "messages") from exc
        prompt = self._encode(ids, shape, "messages")
        output = parsing.output(self.client.tokenizer, prompt.token_ids)
        params = parsing.after_reasoning(params, output, self.client.tokenizer)
        prepared = self.prepared([prompt], params, n, "messages", parsing.constraint)
        prepared.prompt_text, prepared.chat_output = text, output
        return prepared

    def prepared(self, prompts: list[Prompt], params: SamplingParams, n: int, param: str,
                 constraint: Constraint | None) -> Prepared:
        try:
            requests, texts = self.engine_requests(uuid.uuid4().hex, prompts, params, n, param)
        except APIError as exc:
            raise _named(exc, constraint) from exc
        return Prepared(requests, texts, sum(len(p.token_ids) for p in prompts))

    def _encode(self, prompt: str | list[int], shape: Shaping, param: str = "prompt") -> Prompt:
        text, ids = (prompt, None) if isinstance(prompt, str) else (None, prompt)
        if text is not None and self.client.tokenizer is not None:
            ids = encode_text(self.client.tokenizer, text, shape.add_special_tokens)
        if ids is not None:
            ids, cut = shape.apply(ids, self.client.max_model_len)
            text = None if cut else text  # an echo shows what the model read
            if len(ids) >= self.client.max_model_len:
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
            return SSEResponse(events(meta, handle, prompt_tokens, body.include_usage), handle.close)
        try:
            finished, outputs = await unless_disconnected(raw, handle.result())
        except RequestFailed as exc:
            raise APIError(exc.status, exc.message) from exc
        finally:
            handle.close()
        if not finished:
            return Response(status_code=499)  # nobody reads it: the client is gone
        return Response(json_bytes(full_response(meta, outputs, prompt_tokens)), media_type="application/json")


def _named(error: APIError, constraint: Constraint | None) -> APIError:
    """An engine error about the output constraint, named after the request field that asked for it."""
    if constraint is None or error.param != "structured_outputs" or constraint.param == "structured_outputs":
        return error
    return APIError(error.status, f"{constraint.field}: {error.message}", constraint.param, error.code)


def _size(constraint: Constraint | None) -> int:
    return 0 if constraint is None else constraint.size


def _token_id_text(token: int) -> str:
    """``return_tokens_as_token_ids``: a token named by its id, whatever its bytes."""
    return f"token_id:{token}"


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
