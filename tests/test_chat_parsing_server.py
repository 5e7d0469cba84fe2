"""Tool calls and reasoning through the server, with the ``openai`` client.

A tiny random model writes gibberish, so the parse path is driven two ways: (1) the real app
(routes, serving, responses) over an in-process transport, with a stub engine client whose choices'
texts are fixed model outputs, streamed in pieces; (2) a real ``tandem serve`` with the flags, on a
tiny Qwen3 checkpoint whose chat template renders tools, tool calls and tool results (written here)
and opens <think>: the reasoning split of what the model really wrote, and the template's inputs."""
from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from checkpoints import make_tokenizer
from chunking import chunkings
from tandem.config import EngineConfig
from tandem.engine.output_processor import OutputProcessor
from tandem.engine.processor import InputProcessor
from tandem.model.sources import load_tokenizer, resolve_model_config
from tandem.outputs import CompletionOutput, RequestOutput
from tandem.server.app import create_app
from tandem.server.chat_output import ChatParsing
from tandem.server.metrics import ServerMetrics

# ChatML with Hermes-style tools: written for these tests (no model's template is copied)
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nFunctions you may call:\n<tools>\n"
    "{%- for tool in tools %}{{ tool | tojson }}\n{%- endfor %}</tools>\n"
    "Call one as <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call><|im_end|>\n{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}<|im_start|>user\n<tool_response id=\"{{ m.tool_call_id }}\">"
    "{{ m.content }}</tool_response><|im_end|>\n"
    "{%- elif m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n{{ m.content or '' }}"
    "{%- for c in m.tool_calls %}<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}"
    "</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is not defined or enable_thinking %}<think>\n{%- else %}<think>\n\n</think>\n\n"
    "{%- endif %}{%- endif %}"
)
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21°C"},
    {"role": "user", "content": "And in Zürich?"},
]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "opts": {"units": ["°C"]}}}\n</tool_call>'


@pytest.fixture(scope="module")
def tool_checkpoint(checkpoint_dir, tmp_path_factory) -> Path:
    """The tiny qwen3 checkpoint with the template above."""
    path = tmp_path_factory.mktemp("ckpt-tools")
    shutil.copytree(checkpoint_dir("qwen3"), path, dirs_exist_ok=True)
    tokenizer = make_tokenizer()
    tokenizer.add_tokens(["<think>", "</think>"])  # plain tokens, as in Qwen3's tokenizer
    tokenizer.chat_template = TOOL_TEMPLATE
    tokenizer.save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():  # their rows: those of a common token (so a logit bias makes them likely)
        common = tokenizer.encode("the", add_special_tokens=False)[0]
        for table in {model.get_input_embeddings().weight, model.get_output_embeddings().weight}:
            table[-2:] = table[common]
    model.save_pretrained(path)
    return path


# --- (1) the app with a stub engine -------------------------------------------------------------
class _Handle:
    """A request's choices, each a fixed text delivered in pieces (as the engine's steps would)."""

    def __init__(self, requests, texts: list[str], seed: int) -> None:
        self.engine_ids = [r.request_id for r in requests]
        self.requests = requests
        self.pieces = [chunkings(t, 3, seed)[-1] for t in texts]
        self.outputs: list[RequestOutput | None] = [None] * len(texts)

    def _output(self, i: int, upto: int) -> RequestOutput:
        done = upto == len(self.pieces[i])
        text = "".join(self.pieces[i][:upto])
        completion = CompletionOutput(0, text, [5] * upto, "stop" if done else None)
        return RequestOutput(self.engine_ids[i], None, self.requests[i].prompt_token_ids, [completion], done)

    async def updates(self):
        for step in range(1, max(map(len, self.pieces)) + 1):
            update = []
            for i, pieces in enumerate(self.pieces):
                if step <= len(pieces):
                    self.outputs[i] = self._output(i, step)
                    update.append((i, self.outputs[i]))
            yield update
            await asyncio.sleep(0)

    async def result(self):
        async for _ in self.updates():
            pass
        return list(self.outputs)

    def close(self) -> None:
        pass


class StubEngine:
    """What Serving reads of EngineClient, with outputs scripted by the test (``texts``)."""

    max_num_waiting = None

    def __init__(self, checkpoint: Path) -> None:
        self.tokenizer = load_tokenizer(str(checkpoint))
        self.model_config = resolve_model_config(str(checkpoint))
        self.max_model_len = 512
        self.processor = InputProcessor(self.model_config, self.tokenizer, 512, EngineConfig.from_options(
            str(checkpoint)))
        self.output_processor = OutputProcessor(self.tokenizer)
        self.metrics = ServerMetrics("tiny")
        self.texts: list[str] = []
        self.submitted: list = []

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _admit(self, count: int) -> None:
        pass

    def submit(self, requests, prompts, stream: bool) -> _Handle:
        self.submitted = requests
        return _Handle(requests, self.texts[:len(requests)], seed=len(self.submitted))

    def prompt(self) -> str:
        return self.decode(self.submitted[0].prompt_token_ids)


@pytest.fixture
def stub(tool_checkpoint) -> StubEngine:
    return StubEngine(tool_checkpoint)


def _openai(stub: StubEngine, parsing: ChatParsing) -> openai.AsyncOpenAI:
    app = create_app(stub, ["tiny"], "tiny", None, chat_parsing=parsing)  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=app)
    return openai.AsyncOpenAI(base_url="http://stub/v1", api_key="x", max_retries=0,
                              http_client=httpx.AsyncClient(transport=transport, base_url="http://stub"))


async def _both(client: openai.AsyncOpenAI, **kw) -> tuple:
    """The response, and the stream's deltas rebuilt per choice (content, reasoning, calls, finish)."""
    full = await client.chat.completions.create(model="tiny", **kw)
    rebuilt: dict[int, dict] = {}
    async for event in await client.chat.completions.create(model="tiny", stream=True, **kw):
        for choice in event.choices:
            r = rebuilt.setdefault(choice.index, {"content": "", "reasoning": "", "calls": {}, "finish": None})
            delta = choice.delta.model_dump()
            r["content"] += delta.get("content") or ""
            r["reasoning"] += delta.get("reasoning_content") or ""
            for item in delta.get("tool_calls") or []:
                call = r["calls"].setdefault(item["index"], {"id": item["id"], "name": "", "arguments": ""})
                call["name"] += (item["function"] or {}).get("name") or ""
                call["arguments"] += (item["function"] or {}).get("arguments") or ""
            r["finish"] = choice.finish_reason or r["finish"]
    return full, rebuilt


def _run(coro):
    return asyncio.run(coro)


def test_auto_tool_calls_in_the_response_and_the_stream(stub):
    client = _openai(stub, ChatParsing("hermes", True))
    stub.texts = ["Let me look.\n" + CALL + "\n" + CALL.replace("Zürich", "Oslo")]
    full, streamed = _run(_both(client, messages=HISTORY, tools=[WEATHER_TOOL], max_tokens=50))
    prompt = stub.prompt()
    assert '"name": "get_weather"' in prompt and "The weather in a city" in prompt  # the tools, rendered
    assert '<tool_response id="call_1">sunny, 21°C</tool_response>' in prompt  # the tool message
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in prompt  # an object
    choice = full.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look."
    calls = choice.message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather"] * 2 and calls[0].id != calls[1].id
    assert [json.loads(c.function.arguments)["city"] for c in calls] == ["Zürich", "Oslo"]
    assert json.loads(calls[0].function.arguments)["opts"] == {"units": ["°C"]}
    s = streamed[0]
    assert s["finish"] == "tool_calls" and s["content"] == "Let me look." and s["reasoning"] == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in s["calls"].values()] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in calls]
    assert all(c["id"].startswith("call_") for c in s["calls"].values())


def test_parallel_tool_calls_false_keeps_one_call(stub):
    client = _openai(stub, ChatParsing("hermes", True))
    stub.texts = [CALL + CALL.replace("Zürich", "Oslo")]
    full, streamed = _run(_both(client, messages=HISTORY, tools=[WEATHER_TOOL], parallel_tool_calls=False,
                                max_tokens=50))
    assert [json.loads(c.function.arguments)["city"] for c in full.choices[0].message.tool_calls] == ["Zürich"]
    assert [json.loads(c["arguments"])["city"] for c in streamed[0]["calls"].values()] == ["Zürich"]


def test_reasoning_then_a_call_and_n_choices_each_parsed(stub):
    client = _openai(stub, ChatParsing("hermes", True, "qwen3"))  # the template opens <think>
    stub.texts = ["I need the weather.</think>\n\n" + CALL, "No call needed.</think>\n\nIt is sunny."]
    full, streamed = _run(_both(client, messages=HISTORY, tools=[WEATHER_TOOL], n=2, max_tokens=50))
    first, second = full.choices
    assert first.message.model_extra["reasoning_content"] == "I need the weather."
    assert first.message.content is None and first.finish_reason == "tool_calls"
    assert second.message.model_extra["reasoning_content"] == "No call needed."
    assert second.message.content == "It is sunny." and second.message.tool_calls is None
    assert second.finish_reason == "stop"
    assert streamed[0]["reasoning"] == "I need the weather." and len(streamed[0]["calls"]) == 1
    assert streamed[1] == {"content": "It is sunny.", "reasoning": "No call needed.", "calls": {}, "finish": "stop"}


def test_include_reasoning_false_and_a_malformed_call_left_as_content(stub):
    client = _openai(stub, ChatParsing("hermes", True, "qwen3"))
    bad = '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>'
    stub.texts = ["private</think>" + bad]
    full, streamed = _run(_both(client, messages=HISTORY[:1], tools=[WEATHER_TOOL], max_tokens=50,
                                extra_body={"include_reasoning": False}))
    message = full.choices[0].message
    assert message.content == bad and message.model_extra["reasoning_content"] is None
    assert full.choices[0].finish_reason == "stop" and streamed[0]["content"] == bad and not streamed[0]["reasoning"]


def test_no_tools_and_no_parser_keep_the_plain_path(stub):
    client = _openai(stub, ChatParsing())
    stub.texts = ["<think>not parsed</think>" + CALL]
    full, streamed = _run(_both(client, messages=HISTORY[:1], max_tokens=50))
    assert full.choices[0].message.content == stub.texts[0] and full.choices[0].message.tool_calls is None
    assert "reasoning_content" not in full.choices[0].message.model_extra
    assert streamed[0]["content"] == stub.texts[0] and streamed[0]["finish"] == "stop"


@pytest.mark.parametrize("parsing, kw, param", [
    (ChatParsing(), {"tools": [WEATHER_TOOL]}, "tool_choice"),  # auto needs the flags
    (ChatParsing("hermes", True), {"tool_choice": "required"}, "tool_choice"),  # no tools
    (ChatParsing("hermes", True), {"tools": [WEATHER_TOOL], "tool_choice": {"type": "function",
                                                                             "function": {"name": "other"}}},
     "tool_choice"),
    (ChatParsing("hermes", True), {"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
    (ChatParsing("mistral", True), {"tools": [{"type": "function", "function": {"name": "f", "strict": True}}]},
     "tools"),
])
def test_refusals_name_the_field(stub, parsing, kw, param):
    client = _openai(stub, parsing)
    with pytest.raises(openai.BadRequestError) as err:
        _run(client.chat.completions.create(model="tiny", messages=HISTORY[:1], **kw))
    assert err.value.body["param"] == param, err.value.body


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_required_and_named_tool_choice(stub, choice):
    """The output is constrained by a schema made from the tools (the real engine: test_served_required_and_named);
    here fixed outputs show how they are read."""
    client = _openai(stub, ChatParsing())
    stub.texts = ['[{"name": "get_weather", "parameters": {"city": "Oslo"}}]' if choice == "required"
                  else '{"city": "Oslo"}']
    kw = dict(messages=HISTORY[:1], tools=[WEATHER_TOOL], tool_choice=choice, max_tokens=50)
    full, streamed = _run(_both(client, **kw))
    spec = stub.submitted[0].params.structured_outputs
    assert spec.kind == "json" and spec.disable_any_whitespace
    assert spec.json["type"] == ("array" if choice == "required" else "object")
    calls = full.choices[0].message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("get_weather", {"city": "Oslo"})]
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed[0]["calls"].values()] == \
        [("get_weather", {"city": "Oslo"})]
    assert full.choices[0].finish_reason == ("tool_calls" if choice == "required" else "stop")


# --- (2) a real server with the flags -------------------------------------------------------------
@pytest.fixture(scope="module")
def tool_server(tool_checkpoint):
    from server_utils import ServerProcess

    proc = ServerProcess("--model", str(tool_checkpoint), "--served-model-name", "tiny", "--max-model-len", "512",
                         "--max-num-seqs", "4", "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                         "--reasoning-parser", "qwen3")
    yield proc
    proc.stop()


def test_served_reasoning_is_what_the_model_wrote(tool_server):
    """The template opens <think>: the model's whole greedy output (no </think> in it) is reasoning."""
    client = openai.OpenAI(base_url=tool_server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    ids = httpx.post(tool_server.url + "/tokenize", json={"messages": HISTORY[:1]}, timeout=30).json()["tokens"]
    kw = dict(max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    text = client.completions.create(model="tiny", prompt=ids, **kw).choices[0].text
    assert "</think>" not in text and text
    chat = client.chat.completions.create(model="tiny", messages=HISTORY[:1], **kw).choices[0]
    assert chat.message.model_extra["reasoning_content"] == text and chat.message.content is None
    streamed = [e.choices[0].delta.model_dump() for e in client.chat.completions.create(
        model="tiny", messages=HISTORY[:1], stream=True, **kw) if e.choices]
    assert "".join(d.get("reasoning_content") or "" for d in streamed) == text
    assert "".join(d.get("content") or "" for d in streamed) == ""


def test_served_tools_conversation(tool_server):
    client = openai.OpenAI(base_url=tool_server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    r = client.chat.completions.create(model="tiny", messages=HISTORY, tools=[WEATHER_TOOL], max_tokens=8,
                                       temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls") and choice.message.role == "assistant"
    assert r.usage.prompt_tokens > 100  # the tools and the history are in the prompt
    with_tools = httpx.post(tool_server.url + "/tokenize", json={"messages": HISTORY, "tools": [WEATHER_TOOL]},
                            timeout=30).json()["count"]
    assert with_tools == r.usage.prompt_tokens  # /tokenize renders the tools as chat does
    assert httpx.post(tool_server.url + "/tokenize", json={"messages": HISTORY}, timeout=30).json()["count"] < with_tools
    events = list(client.chat.completions.create(model="tiny", messages=HISTORY, tools=[WEATHER_TOOL], max_tokens=8,
                                                 temperature=0, stream=True))
    assert events[-1].choices[0].finish_reason == choice.finish_reason


CITY_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Zürich"]}}, "required": ["city"]}}}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_served_required_and_named(tool_server, choice):
    """The engine's grammar makes even a random model's output a valid call (thinking off: a constraint
    starts at the output's first token)."""
    client = openai.OpenAI(base_url=tool_server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    kw = dict(model="tiny", messages=HISTORY[:1], tools=[CITY_TOOL], tool_choice=choice, parallel_tool_calls=False,
              max_tokens=100, temperature=1.0, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    for seed in range(3):
        choice_ = client.chat.completions.create(seed=seed, **kw).choices[0]
        (call,) = choice_.message.tool_calls
        assert call.function.name == "get_weather" and call.id
        assert json.loads(call.function.arguments)["city"] in ("Paris", "Oslo", "Zürich")
        assert choice_.finish_reason == ("tool_calls" if choice == "required" else "stop")
        streamed = [e.choices[0].delta for e in client.chat.completions.create(seed=seed, stream=True, **kw)
                    if e.choices]
        arguments = "".join(c.function.arguments or "" for d in streamed for c in d.tool_calls or [])
        assert json.loads(arguments) == json.loads(call.function.arguments)


def test_served_constraint_after_reasoning(tool_server):
    """The template leaves the output inside <think>: the model reasons freely, and the call's grammar
    starts after its </think> (pushed by a logit bias so that a random model writes it soon)."""
    end = httpx.post(tool_server.url + "/tokenize", json={"prompt": "</think>", "add_special_tokens": False},
                     timeout=30).json()["tokens"]
    assert len(end) == 1
    client = openai.OpenAI(base_url=tool_server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    kw = dict(model="tiny", messages=HISTORY[:1], tools=[CITY_TOOL], tool_choice="required", max_tokens=120,
              temperature=1.0, logit_bias={str(end[0]): 9.0}, parallel_tool_calls=False)
    for seed in range(3):
        choice = client.chat.completions.create(seed=seed, **kw).choices[0]
        assert choice.message.model_extra["reasoning_content"], choice
        (call,) = choice.message.tool_calls
        assert json.loads(call.function.arguments)["city"] in ("Paris", "Oslo", "Zürich")
        assert choice.finish_reason == "tool_calls"
