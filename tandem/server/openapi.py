"""The app's OpenAPI schema: FastAPI's, generated from the request models, made to say what this
server does.

- Validation errors are 400 (OpenAI's behaviour; ``errors.py`` remaps FastAPI's 422): 422 is dropped.
- The bounds that depend on the served model and the server's options (``protocol.LIMIT_KEY``
  marks) are filled in from the objects that enforce them, the engine's ``InputProcessor`` and the
  per-request limits: token ids below the vocabulary size, ``max_tokens`` and token-id prompts within
  the context, the stop-string caps, ``n`` and prompts per request, the model names, and whether a
  request may bring its own ``chat_template``.
- Integer bounds stay exact (FastAPI's own pass would turn ``2**63 - 1`` into ``2**63``).
- With an API key, the ``/v1`` operations require it (HTTP bearer) and document the 401.

Routes declare their own codes and media types (``GENERATION_RESPONSES``, ``TOKENIZER_RESPONSES``,
``HEALTH_RESPONSES``)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from tandem.server.errors import ErrorBody
from tandem.server.protocol import (LIMIT_KEY, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                    DetokenizeResponse, TokenizeRequest, TokenizeResponse)
from tandem.server.security import needs_key

if TYPE_CHECKING:
    from tandem.server.serving import Serving

_WHY = {400: "invalid request (the message and ``param`` name the field)", 401: "missing or wrong API key",
        404: "no such model", 408: "the body did not arrive within --request-read-timeout",
        413: "request body over --max-request-bytes", 429: "at capacity: retry later",
        503: "the engine core is not running"}
REF_TEMPLATE = "#/components/schemas/{model}"
ERROR_REF = {"$ref": REF_TEMPLATE.format(model="ErrorBody")}
_MODELS = (CompletionRequest, ChatCompletionRequest, TokenizeRequest, TokenizeResponse, DetokenizeRequest,
           DetokenizeResponse, ErrorBody)

# one server-sent event of a streamed completion: a JSON chunk, an error, or the final [DONE]
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string", "description": "a chunk (JSON), an error (JSON) or [DONE]"},
    "event": {"type": "string"}}}
_GENERATION_200 = {"description": "the completion; a stream of server-sent events with stream: true",
                   "content": {"application/json": {"schema": {"type": "object"}},
                               "text/event-stream": {"schema": SSE_EVENT}}}

_HEALTH_503 = {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}
HEALTH_RESPONSES = {200: {"description": "the engine core is alive and making progress (no body)"},
                    503: {"description": "it is not: the reason",
                          "content": {"application/json": {"schema": _HEALTH_503}}}}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for these error statuses, each with OpenAI's error body."""
    return {code: {"model": ErrorBody, "description": _WHY[code]} for code in codes}


# the routes' ``responses=``: a body's own errors (400, 404 for the model), its delivery (408, 413), load
TOKENIZER_RESPONSES = error_responses(400, 404, 408, 413, 429)
GENERATION_RESPONSES = {200: _GENERATION_200, **TOKENIZER_RESPONSES, **error_responses(503)}


@dataclass(frozen=True)
class ServerLimits:
    """What the server checks that depends on the served model and its options."""

    vocab_size: int
    max_model_len: int
    max_stop_strings: int
    max_stop_string_length: int
    served_names: tuple[str, ...]
    max_n: int  # choices per prompt
    max_prompts: int  # prompts per request
    trust_chat_template: bool = False  # --trust-request-chat-template: requests may bring a chat_template

    @classmethod
    def of(cls, serving: Serving) -> ServerLimits:
        """From the objects that enforce them: the engine's ``InputProcessor`` and the per-request
        limits (a request over the server's capacity is refused too: it could never be admitted)."""
        processor, limits, client = serving.client.processor, serving.limits, serving.client
        waiting = client.max_num_waiting
        capacity = None if waiting is None else client.info.max_num_seqs + waiting
        most = limits.max_seqs if capacity is None else min(limits.max_seqs, capacity)
        return cls(processor.vocab_size, processor.max_model_len, processor.max_stop_strings,
                   processor.max_stop_string_length, tuple(serving.served_names), min(limits.max_n, most),
                   min(limits.max_prompts, most), limits.trust_request_chat_template)

    def schema_bounds(self) -> dict[str, dict[str, Any]]:
        """JSON Schema keywords for each ``LIMIT_KEY`` mark. A prompt leaves at least one token of
        the context to generate into, so a prompt and ``max_tokens`` each take at most ``max_model_len - 1``."""
        room = self.max_model_len - 1
        return {"token_id": {"maximum": self.vocab_size - 1}, "prompt_ids": {"maxItems": room},
                "max_tokens": {"maximum": room}, "stop_string": {"maxLength": self.max_stop_string_length},
                "stop_list": {"maxItems": self.max_stop_strings},
                "bias_token": {"pattern": decimal_below(self.vocab_size)}, "model": {"enum": list(self.served_names)},
                "n": {"maximum": self.max_n}, "prompt_list": {"maxItems": self.max_prompts},
                "chat_template": {} if self.trust_chat_template else {"not": {}}}  # untrusted: only null


def decimal_below(limit: int) -> str:
    """A regular expression (JSON Schema's dialect) that matches the decimals 0 .. limit - 1 as the
    server reads a ``logit_bias`` key: ASCII digits, no sign, no leading zero."""
    top = str(limit - 1)
    shorter = ["[0-9]"] + [f"[1-9][0-9]{{{n - 1}}}" for n in range(2, len(top))]
    same = []  # as many digits as top: equal to top up to position i, then a smaller digit
    for i, digit in enumerate(top):
        low = 1 if i == 0 and len(top) > 1 else 0
        high = int(digit) - (0 if i == len(top) - 1 else 1)
        if high >= low:
            rest = len(top) - i - 1
            same.append(top[:i] + f"[{low}-{high}]" + (f"[0-9]{{{rest}}}" if rest else ""))
    alternatives = (shorter if len(top) > 1 else []) + same
    return "^(" + "|".join(alternatives) + ")$"


def _fill_limits(node: Any, bounds: dict[str, dict[str, Any]]) -> None:
    if isinstance(node, dict):
        name = node.pop(LIMIT_KEY, None)
        if name is not None:
            node.update(bounds[name])
        for value in node.values():
            _fill_limits(value, bounds)
    elif isinstance(node, list):
        for value in node:
            _fill_limits(value, bounds)


def _write_model(components: dict[str, Any], model: type[BaseModel], only_present: bool) -> None:
    """``model``'s schema (and those of the models it holds) as components, straight from pydantic."""
    body = model.model_json_schema(ref_template=REF_TEMPLATE)
    for name, sub in {**body.pop("$defs", {}), model.__name__: body}.items():
        if name in components or not only_present:
            components[name] = sub


def _exact_components(schema: dict[str, Any]) -> None:
    """FastAPI passes the schema through its own OpenAPI models, which hold every bound as a float:
    ``2**63 - 1`` comes out as ``2**63``. The models' components are written again, exact."""
    components = schema.get("components", {}).get("schemas", {})
    for model in _MODELS:
        _write_model(components, model, only_present=True)


def _operations(schema: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(path, op) for path, item in schema.get("paths", {}).items() for op in item.values()]


def _validation_is_400(schema: dict[str, Any]) -> None:
    for _, op in _operations(schema):
        op.get("responses", {}).pop("422", None)
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)


def _require_bearer(schema: dict[str, Any]) -> None:
    schema.setdefault("components", {}).setdefault("securitySchemes", {})["api_key"] = {
        "type": "http", "scheme": "bearer", "description": "Authorization: Bearer <--api-key>"}
    _write_model(schema["components"].setdefault("schemas", {}), ErrorBody, only_present=False)
    for path, op in _operations(schema):
        if needs_key(path):
            op["security"] = [{"api_key": []}]
            op["responses"]["401"] = {"description": _WHY[401], "content": {"application/json": {"schema": ERROR_REF}}}


def install_openapi(app: FastAPI, limits: Callable[[], ServerLimits], api_key: bool) -> None:
    """``app.openapi()`` builds the schema above on first use (``limits`` is read then)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            _exact_components(schema)
            _fill_limits(schema, limits().schema_bounds())
            _validation_is_400(schema)
            if api_key:
                _require_bearer(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise it
