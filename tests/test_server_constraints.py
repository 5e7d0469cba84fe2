"""Output constraints through the server (issue 23, points 1 and 5): OpenAI's ``response_format``,
vLLM's ``structured_outputs`` and its older ``guided_*`` fields each become the engine's
``StructuredOutputsParams``; a request with two is a 400 naming both, a bad schema, regex or grammar a
400 naming the field. End to end, with the ``openai`` client: random bounded specs
(``structured_cases``) sent the ways a client would, sampled (temperature 1) and greedy, whole and
streamed, and each output checked with the standard tools (``json`` + ``jsonschema``, ``re``, the
choice list)."""
from __future__ import annotations

import asyncio
import json
import random

import openai
import pytest

from server_utils import SERVER_KEY
from structured_cases import MAX_TOKENS, accepts, random_spec
from tandem.sampling_params import SamplingParams
from tandem.server.constraints import engine_kwargs, requested_constraint
from tandem.server.errors import APIError
from tandem.server.protocol import ChatCompletionRequest, CompletionRequest
from tandem.structured_outputs import StructuredOutputsParams

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                          "maximum": 9}},
          "required": ["ok", "n"], "additionalProperties": False}
CHAT = [{"role": "user", "content": "Answer in JSON."}]

# (request fields, the StructuredOutputsParams they must become)
WAYS = [
    ({"response_format": {"type": "json_object"}}, StructuredOutputsParams(json_object=True)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA, "strict": True}}},
     StructuredOutputsParams(json=SCHEMA)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "r"}}}, StructuredOutputsParams(json={})),
    ({"response_format": {"type": "text"}}, None),
    ({"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}},
     StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)),
    ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, StructuredOutputsParams(json=json.dumps(SCHEMA))),
    ({"structured_outputs": {"regex": "[a-c]{2}"}}, StructuredOutputsParams(regex="[a-c]{2}")),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, StructuredOutputsParams(choice=["yes", "no"])),
    ({"structured_outputs": {"grammar": 'root ::= "x" | "y"'}}, StructuredOutputsParams(grammar='root ::= "x" | "y"')),
    ({"structured_outputs": {"json_object": True}}, StructuredOutputsParams(json_object=True)),
    ({"guided_json": SCHEMA, "guided_decoding_backend": "xgrammar"}, StructuredOutputsParams(json=SCHEMA)),
    ({"guided_regex": "[0-9]+", "guided_decoding_backend": "auto"}, StructuredOutputsParams(regex="[0-9]+")),
    ({"guided_choice": ["a", "b"]}, StructuredOutputsParams(choice=["a", "b"])),
    ({"guided_grammar": 'root ::= "z"'}, StructuredOutputsParams(grammar='root ::= "z"')),
]


@pytest.mark.parametrize("route_model, base", [(CompletionRequest, {"prompt": "hi"}),
                                               (ChatCompletionRequest, {"messages": CHAT})])
def test_each_constraint_field_reaches_the_engine(route_model, base):
    for fields, expected in WAYS:
        body = route_model.model_validate({**base, **fields})
        constraint = requested_constraint(body)
        kwargs = {} if constraint is None else engine_kwargs(constraint)
        assert SamplingParams(**kwargs).structured_outputs == expected, fields
    with pytest.raises(APIError) as err:
        requested_constraint(route_model.model_validate({**base, "guided_regex": "a", **WAYS[0][0]}))
    assert err.value.param == "response_format" and "guided_regex" in err.value.message
    with pytest.raises(APIError) as err:
        requested_constraint(route_model.model_validate({**base, "structured_outputs": {"disable_any_whitespace": True}}))
    assert err.value.param == "structured_outputs"


@pytest.fixture(scope="module")
def aclient(server):
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=SERVER_KEY, max_retries=0, timeout=120)


def _fields(spec: StructuredOutputsParams, way: int) -> dict:
    """The request fields a client would send for ``spec``, one of the ways vLLM's server takes it."""
    kind, value = spec.kind, spec.value
    if kind == "json" and spec.disable_any_whitespace:  # only structured_outputs carries the whitespace rule
        return {"structured_outputs": {"json": value, "disable_any_whitespace": True}}
    if way == 0:
        return {f"guided_{kind}": value}
    return {"structured_outputs": {kind: value}}


async def _one(aclient, spec: StructuredOutputsParams, rng: random.Random, stream: bool) -> tuple[str, str]:
    temperature = rng.choice([0.0, 1.0])
    kw = dict(model="tiny", max_tokens=MAX_TOKENS, temperature=temperature, seed=rng.randint(0, 2**31),
              extra_body=_fields(spec, rng.randint(0, 1)))
    chat = rng.random() < 0.5
    if chat:
        create = aclient.chat.completions.create
        kw["messages"] = CHAT
    else:
        create = aclient.completions.create
        kw["prompt"] = rng.choice(["Answer:", "{", "The value is", "x"])
    if not stream:
        r = (await create(**kw)).choices[0]
        return (r.message.content if chat else r.text), r.finish_reason
    text, reason = "", None
    async for ch in await create(stream=True, **kw):
        for c in ch.choices:
            text += (c.delta.content or "") if chat else c.text
            reason = c.finish_reason or reason
    return text, reason


def test_random_specs_give_accepted_outputs_sampled_and_greedy_whole_and_streamed(aclient):
    rng = random.Random(23)
    specs = [random_spec(rng) for _ in range(200)]
    streams = [i % 2 == 1 for i in range(len(specs))]

    async def run():
        slots = asyncio.Semaphore(16)  # the test server runs 16 and queues 8

        async def bounded(spec, stream):
            async with slots:
                return await _one(aclient, spec, rng, stream)

        return await asyncio.wait_for(asyncio.gather(*(bounded(s, st) for s, st in zip(specs, streams))), 900)

    results = asyncio.run(run())
    bad = [(s, text, reason) for s, (text, reason) in zip(specs, results) if reason != "stop" or not accepts(s, text)]
    assert not bad


@pytest.mark.parametrize("fields, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "nothing"}}}},
     "response_format"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"structured_outputs": {"grammar": "root ::= undefined_rule"}}, "structured_outputs"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_decoding_backend": "outlines", "guided_regex": "a"}, "guided_decoding_backend"),
    ({"response_format": {"type": "structural_tag", "format": {"type": "nonsense"}}}, "response_format"),
    ({"structural_tag": "{not json"}, "structural_tag"),
    ({"guided_regex": "a", "structured_outputs": {"choice": ["b"]}}, "structured_outputs"),
])
def test_constraints_that_cannot_be_served_get_a_400_naming_the_field(server, fields, param):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=SERVER_KEY, max_retries=0, timeout=60)
    for create, base in ((client.completions.create, {"prompt": "hi"}),
                         (client.chat.completions.create, {"messages": CHAT})):
        with pytest.raises(openai.BadRequestError) as err:
            create(model="tiny", max_tokens=4, extra_body=fields, **base)
        error = err.value.response.json()["error"]
        assert error["param"] == param and ".cc" not in error["message"], error


def test_a_grammar_that_meets_min_tokens_with_no_token_left_is_a_400(server):
    """Three letters complete the grammar, which then allows only EOS, which min_tokens rules out: the
    request ends with a 400 saying so (whole), or an error event (streamed), and the server serves on."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=SERVER_KEY, max_retries=0, timeout=60)
    kw = dict(model="tiny", prompt="hi", max_tokens=20, temperature=0.0,
              extra_body={"min_tokens": 8, "structured_outputs": {"regex": "[a-f]{1,3}"}})
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**kw)
    assert "no token is left to sample at output index 3" in err.value.response.json()["error"]["message"]
    with pytest.raises(openai.APIError, match="no token is left"):
        list(client.completions.create(stream=True, **kw))
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=3).choices[0].finish_reason == "length"


# a number in <n>...</n>: free text around it, at least one tag (so even a random model writes one)
TAG = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<n>"], "at_least_one": True,
                                            "stop_after_first": True, "tags": [
                                                {"type": "tag", "begin": "<n>", "end": "</n>", "content": {
                                                    "type": "json_schema", "json_schema": {"enum": [7, 42]}}}]}}
LEGACY = {"type": "structural_tag", "structures": [{"begin": "<n>", "schema": {"enum": [7, 42]}, "end": "</n>"}],
          "triggers": ["<n>"]}


def test_structural_tags_reach_the_engine_and_shape_the_output(server):
    """vLLM's three ways (structured_outputs.structural_tag, the older structural_tag text, a
    structural_tag response format, current or legacy shape) become the engine's structural tag."""
    for fields in ({"structured_outputs": {"structural_tag": TAG}}, {"structural_tag": json.dumps(TAG)},
                   {"response_format": {"type": "structural_tag", "format": TAG["format"]}},
                   {"response_format": LEGACY}):
        c = requested_constraint(CompletionRequest.model_validate({"prompt": "hi", **fields}))
        assert c.kind == "structural_tag" and c.value["format"]["tags"][0]["begin"] == "<n>"
        assert SamplingParams(**engine_kwargs(c)).structured_outputs.kind == "structural_tag"
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=SERVER_KEY, max_retries=0, timeout=60)
    for seed in range(3):
        text = client.completions.create(model="tiny", prompt="x", max_tokens=60, temperature=1.0, seed=seed,
                                         extra_body={"structured_outputs": {"structural_tag": TAG}}).choices[0].text
        head, _, rest = text.partition("<n>")
        value, _, tail = rest.partition("</n>")
        assert "<n>" in text and json.loads(value) in (7, 42) and "<n>" not in head + tail, text
