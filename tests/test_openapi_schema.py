"""The OpenAPI schema says what the server does (issue 21, points 8 and 11).

Each request below is judged twice, by the schema the server publishes at /openapi.json and by the
server itself, and the two verdicts must agree: valid and accepted, or invalid and refused with a
400 naming the field. Then the status codes and media types the server answers with are the ones
documented for the operation, and the schema's bounds are the engine's own (``SamplingParams``)."""
from __future__ import annotations

import math
import re

import httpx
import jsonschema_rs
import pytest

from checkpoints import VOCAB_SIZE
from server_utils import SERVER_KEY
from tandem.sampling_params import SamplingParams
from tandem.server.defaults import DEFAULT_MAX_REQUEST_BYTES
from tandem.server.openapi import decimal_below
from tandem.server.protocol import ChatCompletionRequest, CompletionRequest

AUTH = {"Authorization": f"Bearer {SERVER_KEY}"}
COMPONENT = {"/v1/completions": "CompletionRequest", "/v1/chat/completions": "ChatCompletionRequest",
             "/tokenize": "TokenizeRequest", "/detokenize": "DetokenizeRequest"}
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def openapi(server) -> dict:
    return httpx.get(server.url + "/openapi.json", timeout=10).json()


def _schema_accepts(openapi: dict, path: str, body: dict) -> bool:
    root = {"$ref": f"#/components/schemas/{COMPONENT[path]}", "components": openapi["components"]}
    return jsonschema_rs.Draft202012Validator(root).is_valid(body)


# (route, body, the field a refusal names: None where it is accepted, or refused for no one field)
AGREEMENT = [
    # point 8: what the schema allowed and the server refused, or the other way round
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": [""]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "logprobs": None}, None),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": None, "top_logprobs": None, "max_tokens": 2}, None),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{}]}, "tools"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [], "max_tokens": 2}, None),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 2, "max_tokens": 2}, None),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "text"}, "max_tokens": 2}, None),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "json_object"}, "max_tokens": 2}, None),
    ("/tokenize", {}, None),  # refused, naming no one field: exactly one of prompt and messages
    ("/tokenize", {"prompt": "hi", "messages": CHAT}, None),
    ("/tokenize", {"prompt": "hi", "messages": None}, None),
    ("/tokenize", {"messages": []}, "messages"),
    ("/detokenize", {"tokens": [VOCAB_SIZE]}, "tokens"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": [0, VOCAB_SIZE - 1]}, None),
    ("/v1/completions", {"prompt": [0, VOCAB_SIZE]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 512}, "max_tokens"),  # the context is 512
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, "model"),  # 404 (not in the schema's enum)
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [VOCAB_SIZE]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "hi", "stop": ["x"] * 65}, "stop"),  # max_stop_strings is 64
    ("/v1/completions", {"prompt": "hi", "best_of": 2}, "best_of"),
    ("/v1/completions", {"prompt": "hi", "best_of": True}, "best_of"),
    ("/v1/completions", {"prompt": "hi", "best_of": 1, "suffix": ""}, None),
    ("/v1/completions", {"prompt": "hi", "seed": 2**63}, "seed"),
    ("/v1/completions", {"prompt": "hi", "seed": 2**63 - 1, "max_tokens": 1}, None),
    # point 11: strict types
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5_0": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"\u0663": 1}}, "logit_bias"),  # an Arabic-Indic 3
    ("/v1/completions", {"prompt": "hi", "logit_bias": {" 5": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"-1": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {str(VOCAB_SIZE): 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 1, str(VOCAB_SIZE - 1): -100}, "max_tokens": 1}, None),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "hi", "stream": 1}, "stream"),
    ("/v1/completions", {"prompt": "hi", "echo": "true"}, "echo"),
    ("/v1/completions", {"prompt": "hi", "n": "2"}, "n"),
    ("/v1/completions", {"prompt": "hi", "n": True}, "n"),
    ("/v1/completions", {"prompt": "hi", "n": 2.0, "max_tokens": 1.0}, None),  # JSON's 2.0 is the integer 2
    ("/v1/completions", {"prompt": "hi", "n": 2.5}, "n"),
    ("/v1/completions", {"prompt": "hi", "temperature": True}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "temperature": "0.5"}, "temperature"),
    ("/v1/completions", {"prompt": ["hi", 5]}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages"),
    ("/tokenize", {"prompt": "hi", "add_special_tokens": "no"}, "add_special_tokens"),
    # issue 23: the fields of OpenAI's and vLLM's schemas, implemented or refused
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),  # 0 scores the prompt: it needs echo
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0, "echo": True}, None),
    ("/v1/completions", {"prompt": "hi", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ("/v1/completions", {"prompt": "hi", "truncate_prompt_tokens": -1, "max_tokens": 1}, None),
    ("/v1/completions", {"prompt": "hi", "allowed_token_ids": [VOCAB_SIZE]}, "allowed_token_ids"),
    ("/v1/completions", {"prompt": "hi", "allowed_token_ids": []}, "allowed_token_ids"),
    ("/v1/completions", {"prompt": "hi", "priority": 1}, "priority"),
    ("/v1/completions", {"prompt": "hi", "use_beam_search": True}, "use_beam_search"),
    ("/v1/chat/completions", {"messages": CHAT, "chat_template": "{{ x }}"}, "chat_template"),  # not trusted here
    ("/v1/chat/completions", {"messages": CHAT, "add_generation_prompt": True, "continue_final_message": True},
     "continue_final_message"),
    ("/v1/chat/completions", {"messages": CHAT, "continue_final_message": True, "max_tokens": 2}, None),
    ("/v1/chat/completions", {"messages": CHAT, "chat_template_kwargs": {"tools": 1}}, "chat_template_kwargs"),
    ("/v1/chat/completions", {"messages": CHAT, "chat_template_kwargs": {"x": 1}, "max_tokens": 2}, None),
    ("/v1/chat/completions", {"messages": CHAT, "store": True}, "store"),
    ("/v1/chat/completions", {"messages": CHAT, "stream_options": {"include_obfuscation": True}}, "stream_options"),
    ("/tokenize", {"messages": CHAT, "add_generation_prompt": True, "continue_final_message": True},
     "continue_final_message"),
    ("/tokenize", {"prompt": "hi", "return_token_strs": True}, None),
]


@pytest.mark.parametrize("path, body, param", AGREEMENT, ids=[f"{i}-{p}" for i, (p, _, _) in enumerate(AGREEMENT)])
def test_the_schema_and_the_server_agree(server, openapi, path, body, param):
    resp = httpx.post(server.url + path, json=body, headers=AUTH, timeout=30)
    accepted = resp.status_code == 200
    assert _schema_accepts(openapi, path, body) == accepted, resp.text
    refused_as = {"model": 404}.get(param, 400)
    assert resp.status_code == (200 if accepted else refused_as), resp.text
    if not accepted and param is not None:
        assert resp.json()["error"]["param"] == param, resp.text


def _documented(openapi: dict, method: str, path: str, status: int) -> dict:
    responses = openapi["paths"][path][method]["responses"]
    assert str(status) in responses, (method, path, status, sorted(responses))
    return responses[str(status)].get("content", {})


SAMPLES = [  # (method, path, body or raw bytes, headers): answered with a documented code and media type
    ("post", "/v1/completions", {"prompt": "hi", "max_tokens": 2}, AUTH),
    ("post", "/v1/completions", {"prompt": "hi", "max_tokens": 2, "stream": True}, AUTH),
    ("post", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, "stream": True}, AUTH),
    ("post", "/v1/completions", {"prompt": ""}, AUTH),
    ("post", "/v1/completions", b"{", AUTH),
    ("post", "/v1/completions", b"{", {}),
    ("post", "/v1/completions", {"prompt": "hi", "model": "gpt-4"}, AUTH),
    ("post", "/v1/completions", b'{"prompt": "' + b"x" * DEFAULT_MAX_REQUEST_BYTES + b'"}', AUTH),
    ("post", "/v1/chat/completions", {"messages": CHAT, "model": "gpt-4"}, AUTH),
    ("get", "/v1/models", None, AUTH),
    ("get", "/v1/models", None, {"Authorization": f"bearer {SERVER_KEY}"}),
    ("get", "/v1/models", None, {"Authorization": "Bearer wrong"}),
    ("get", "/health", None, {}),
    ("get", "/version", None, {}),
    ("get", "/metrics", None, {}),
    ("get", "/tokenizer_info", None, {}),
    ("post", "/tokenize", {"prompt": "hi"}, {}),
    ("post", "/tokenize", {"prompt": "hi", "model": "gpt-4"}, {}),
    ("post", "/detokenize", {"tokens": [1, 2]}, {}),
    ("post", "/detokenize", {"tokens": [VOCAB_SIZE]}, {}),
]


@pytest.mark.parametrize("method, path, body, headers", SAMPLES, ids=[f"{i}-{s[1]}" for i, s in enumerate(SAMPLES)])
def test_answers_have_documented_codes_and_media_types(server, openapi, method, path, body, headers):
    kw = {"content": body, "headers": {**headers, "Content-Type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body, "headers": headers} if body is not None else {"headers": headers}
    resp = httpx.request(method, server.url + path, timeout=30, **kw)
    content = _documented(openapi, method, path, resp.status_code)
    media_type = resp.headers.get("content-type", "").split(";")[0]
    if not content:
        assert resp.content == b"" and not media_type
    else:
        assert media_type in content, (resp.status_code, media_type, sorted(content))


def test_each_operation_documents_its_codes_and_no_422(openapi):
    codes = {(method.upper(), path): sorted(op["responses"]) for path, item in openapi["paths"].items()
             for method, op in item.items()}
    generation = ["200", "400", "401", "404", "408", "413", "429", "503"]
    tokenizer = ["200", "400", "404", "408", "413", "429"]
    assert codes == {("GET", "/v1/models"): ["200", "401"], ("POST", "/v1/completions"): generation,
                     ("POST", "/v1/chat/completions"): generation, ("GET", "/health"): ["200", "503"],
                     ("GET", "/version"): ["200"], ("GET", "/metrics"): ["200"], ("POST", "/tokenize"): tokenizer,
                     ("POST", "/detokenize"): tokenizer, ("GET", "/tokenizer_info"): ["200"]}
    assert "422" not in str(openapi) and "HTTPValidationError" not in openapi["components"]["schemas"]
    streamed = openapi["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]
    assert set(streamed) == {"application/json", "text/event-stream"}
    assert openapi["components"]["securitySchemes"]["api_key"] == {
        "type": "http", "scheme": "bearer", "description": "Authorization: Bearer <--api-key>"}
    secured = {path for path, item in openapi["paths"].items() for op in item.values() if "security" in op}
    assert secured == {"/v1/models", "/v1/completions", "/v1/chat/completions"}


def test_the_bounds_that_depend_on_the_model_are_this_servers(openapi):
    schemas = openapi["components"]["schemas"]
    assert schemas["DetokenizeRequest"]["properties"]["tokens"]["items"]["maximum"] == VOCAB_SIZE - 1
    completion = schemas["CompletionRequest"]["properties"]
    assert completion["max_tokens"]["anyOf"][0]["maximum"] == 511  # --max-model-len 512
    assert completion["model"]["anyOf"][0]["enum"] == ["tiny"]
    assert completion["stop"]["anyOf"][1]["maxItems"] == 64 and completion["stop"]["anyOf"][0]["maxLength"] == 1024
    assert completion["seed"]["anyOf"][0]["maximum"] == 2**63 - 1  # exact: not 2**63 through a float
    assert "x-tandem-limit" not in str(openapi)


@pytest.mark.parametrize("limit", [1, 2, 9, 10, 11, 99, 100, 101, 448, 1000, 1001, 32000, 151936])
def test_decimal_below_matches_exactly_the_ids_below_the_limit(limit):
    pattern = re.compile(decimal_below(limit))
    assert all(pattern.fullmatch(str(i)) for i in range(limit))
    assert not any(pattern.fullmatch(str(i)) for i in range(limit, limit + 2000))
    assert not any(pattern.fullmatch(s) for s in ("", "-1", "-0", "00", "01", "1_0", "\u0663", " 1", "1 ", "+1"))


# (field, JSON Schema keyword, what SamplingParams takes for a value): the schema's bound is the engine's
ENGINE_BOUNDS = [("temperature", "minimum"), ("top_p", "exclusiveMinimum"), ("top_p", "maximum"), ("top_k", "minimum"),
                 ("min_p", "minimum"), ("min_p", "maximum"), ("seed", "minimum"), ("seed", "maximum"),
                 ("presence_penalty", "minimum"), ("presence_penalty", "maximum"), ("frequency_penalty", "minimum"),
                 ("frequency_penalty", "maximum"), ("repetition_penalty", "minimum"),
                 ("repetition_penalty", "maximum"), ("logprobs", "minimum"), ("logprobs", "maximum"),
                 ("min_tokens", "minimum"), ("n", "minimum"), ("max_tokens", "minimum"), ("logit_bias", "minimum"),
                 ("logit_bias", "maximum")]


def _edges(bound: float, keyword: str, integer: bool) -> tuple[float, float]:
    """(the value nearest the bound that the keyword allows, the nearest it refuses)."""
    def toward(value: float, up: bool) -> float:
        return value + (1 if up else -1) if integer else math.nextafter(value, math.inf if up else -math.inf)

    lower = keyword.endswith("inimum")  # minimum, exclusiveMinimum
    if keyword.startswith("exclusive"):
        return toward(bound, lower), bound
    return bound, toward(bound, not lower)


@pytest.mark.parametrize("field, keyword", ENGINE_BOUNDS, ids=[f"{f}-{k}" for f, k in ENGINE_BOUNDS])
def test_the_schema_bounds_are_the_engines(field, keyword):
    # completions take max_tokens 0 with echo (scoring: the server generates one token and shows none),
    # so the engine's bound is chat's
    model = ChatCompletionRequest if field == "max_tokens" else CompletionRequest
    prop = model.model_json_schema()["properties"][field]["anyOf"][0]
    if field == "logit_bias":
        prop = prop["additionalProperties"]
    value, integer = prop[keyword], prop["type"] == "integer"
    allowed, refused = _edges(value, keyword, integer)

    def params(v):
        return SamplingParams(logit_bias={0: v}) if field == "logit_bias" else SamplingParams(**{field: v})

    params(allowed)
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        params(refused)
