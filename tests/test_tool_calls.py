"""Tool calls: each parser on templated model outputs (several calls, nested JSON, unicode, malformed
calls left as content), streamed in random chunkings equal to the whole-text parse; tool_choice's
checks and the schema that "required" / a named function constrain the output to; the chat message
and stream deltas built from them (the server end to end: tests/test_chat_parsing_server.py)."""
from __future__ import annotations

import json

import jsonschema
import pytest

from chunking import chunkings
from tandem.server.chat_output import ChatParsing
from tandem.server.errors import APIError
from tandem.server.tools import TOOL_PARSERS, ToolCallStream, parse_tool_calls, tool_parser
from tandem.server.tools.forced import RequiredToolParser, required_schema
from tandem.server.tools.protocol import ChatTool, NamedToolChoice
from tandem.server.tools.request import tool_use

WEATHER = {"city": "Zürich", "units": {"kind": "metric", "precision": [1, 2]}, "note": "雨か? \"quoted\""}
SEARCH = {"query": "naïve café ☕", "filters": {"year": {"gte": 2020}, "tags": ["a", "b"]}}


def _args(d: dict) -> str:
    return json.dumps(d, ensure_ascii=False)


def _hermes(name: str, args: dict) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {_args(args)}}}\n</tool_call>'


# (parser, model output, expected content, expected [(name, arguments object)])
CASES = [
    ("hermes", _hermes("get_weather", WEATHER), None, [("get_weather", WEATHER)]),
    ("hermes", "Let me check both.\n" + _hermes("get_weather", WEATHER) + "\n" + _hermes("search", SEARCH) + "\n",
     "Let me check both.", [("get_weather", WEATHER), ("search", SEARCH)]),
    ("hermes", "No tools needed: 3 < 4 and a <tool is fine.", "No tools needed: 3 < 4 and a <tool is fine.", []),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call> then text',  # unbalanced JSON
     '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call> then text', []),
    ("hermes", '<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),  # no name
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": [1, {"b": null}]}}', None,  # unclosed, whole JSON
     [("f", {"a": [1, {"b": None}]})]),
    ("hermes", '<tool_call>\n{"name": "f", "argum', '<tool_call>\n{"name": "f", "argum', []),  # cut off
    ("hermes", _hermes("f", {}) + "\nDone: é", "Done: é", [("f", {})]),
    ("hermes", '<tool_call>{"name": "f", "parameters": {"x": "y"}}</tool_call>', None, [("f", {"x": "y"})]),
    ("llama3_json", '{"name": "get_weather", "parameters": ' + _args(WEATHER) + "}", None,
     [("get_weather", WEATHER)]),
    ("llama3_json", '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": ' + _args(SEARCH) + "}",
     None, [("a", {"x": 1}), ("b", SEARCH)]),
    ("llama3_json", '<|python_tag|>{"name": "a", "arguments": {"x": "ü"}}', None, [("a", {"x": "ü"})]),
    ("llama3_json", 'Calling it.<|python_tag|>{"name": "a", "parameters": {}}', "Calling it.", [("a", {})]),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),  # JSON, but not a call
    ("llama3_json", '{"name": "a", "parameters": {"x": 1}} and more', '{"name": "a", "parameters": {"x": 1}} and more',
     []),
    ("llama3_json", 'The set {"name": "a", "parameters": {}} is here', 'The set {"name": "a", "parameters": {}} is here',
     []),  # a call only at the start
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": ' + _args(WEATHER) + '}, {"name": "s", '
     '"arguments": ' + _args(SEARCH) + "}]", None, [("get_weather", WEATHER), ("s", SEARCH)]),
    ("mistral", ' [{"name": "f", "arguments": {"a": "b"}}]', None, [("f", {"a": "b"})]),  # the marker skipped
    ("mistral", "[TOOL_CALLS]get_weather[ARGS]" + _args(WEATHER) + "[TOOL_CALLS]s[ARGS]" + _args(SEARCH), None,
     [("get_weather", WEATHER), ("s", SEARCH)]),
    ("mistral", 'Sure.[TOOL_CALLS]f[CALL_ID]abc123XYZ[ARGS]{"k": "v"}', "Sure.", [("f", {"k": "v"})]),
    ("mistral", "[TOOL_CALLS]f[ARGS]{oops", "[TOOL_CALLS]f[ARGS]{oops", []),
    ("mistral", "[1] A footnote, not a call.", "[1] A footnote, not a call.", []),
]


def _calls(calls) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("name, text, content, calls", CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(CASES)])
def test_parsers_on_templated_outputs(name, text, content, calls):
    got_content, got_calls = parse_tool_calls(tool_parser(name), text)
    assert got_content == content
    assert _calls(got_calls) == calls
    assert all(json.loads(c.arguments) is not None for c in got_calls)


def _streamed(parser, pieces: list[str], parallel: bool = True) -> tuple[str, list]:
    stream = ToolCallStream(parser, parallel)
    content, calls = "", []
    for i, piece in enumerate(pieces):
        delta = stream.feed(piece, final=i == len(pieces) - 1)
        content += delta.content
        calls += delta.calls
    if not pieces:
        delta = stream.feed("", final=True)
        content, calls = content + delta.content, calls + delta.calls
    return content, calls


@pytest.mark.parametrize("name, text, content, calls", CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(CASES)])
def test_streamed_in_any_chunking_equals_the_whole_parse(name, text, content, calls):
    parser = tool_parser(name)
    for pieces in chunkings(text, 25, seed=len(text)):
        got_content, got_calls = _streamed(parser, pieces)
        assert got_content == (content or ""), pieces
        assert _calls(got_calls) == calls, pieces


def test_content_is_never_taken_back_and_held_only_near_a_marker():
    stream = ToolCallStream(tool_parser("hermes"))
    assert stream.feed("Hello wor").content == "Hello wor"
    assert stream.feed("ld <tool_").content == "ld"  # " <tool_" may open a call: held
    assert stream.feed("box>").content == " <tool_box>"
    delta = stream.feed(_hermes("f", {"a": 1}))
    assert delta.content == "" and _calls(delta.calls) == [("f", {"a": 1})]


def test_call_ids_are_distinct_and_in_each_format():
    _, calls = parse_tool_calls(tool_parser("hermes"), _hermes("f", {}) + _hermes("g", {}))
    assert calls[0].id != calls[1].id and all(c.id.startswith("call_") for c in calls)
    _, calls = parse_tool_calls(tool_parser("mistral"), "[TOOL_CALLS]f[ARGS]{}")
    assert len(calls[0].id) == 9 and calls[0].id.isalnum()  # Mistral's templates check this


def test_parallel_tool_calls_false_keeps_the_first_call():
    text = _hermes("f", {"i": 1}) + _hermes("g", {"i": 2})
    assert _calls(parse_tool_calls(tool_parser("hermes"), text, parallel=False)[1]) == [("f", {"i": 1})]
    for pieces in chunkings(text, 5):
        assert _calls(_streamed(tool_parser("hermes"), pieces, parallel=False)[1]) == [("f", {"i": 1})]


def test_every_registered_parser_leaves_plain_text_alone():
    for name in TOOL_PARSERS:
        for text in ["", "   ", "Just an answer.\n", "ünïcödé ✓ \n\n"]:
            assert parse_tool_calls(tool_parser(name), text) == (text, [])
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        tool_parser("nope")


# --- tool_choice: "required" and a named function ---------------------------------------------
TOOLS = [ChatTool.model_validate({"type": "function", "function": {
             "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                   "required": ["city"], "additionalProperties": False}}}),
         ChatTool.model_validate({"type": "function", "function": {"name": "now"}})]


def test_the_required_schema_accepts_calls_and_rejects_the_rest():
    use = tool_use(TOOLS, "required", True, None)
    assert use.mode == "required" and [t["function"]["name"] for t in use.tools] == ["get_weather", "now"]
    good = [{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "now", "parameters": {}}]
    jsonschema.validate(good, use.schema)
    for bad in [[], [{"name": "other", "parameters": {}}], [{"name": "get_weather", "parameters": {}}],
                [{"name": "get_weather", "parameters": {"city": 5}}], [{"name": "now"}]]:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, use.schema)
    with pytest.raises(jsonschema.ValidationError):  # parallel_tool_calls: false allows one call
        jsonschema.validate(good, tool_use(TOOLS, "required", False, None).schema)
    content, calls = parse_tool_calls(RequiredToolParser(), json.dumps(good))
    assert content is None and _calls(calls) == [("get_weather", {"city": "Oslo"}), ("now", {})]


def test_a_named_function_constrains_the_output_to_its_arguments():
    use = tool_use(TOOLS, NamedToolChoice.model_validate({"type": "function", "function": {"name": "get_weather"}}),
                   True, None)
    assert use.mode == "named" and use.named == "get_weather"
    jsonschema.validate({"city": "Oslo"}, use.schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"town": "Oslo"}, use.schema)
    assert required_schema([{"type": "function", "function": {"name": "x"}}], True)["items"]["anyOf"][0][
        "properties"]["parameters"] == {"type": "object"}


@pytest.mark.parametrize("tools, choice, auto_parser, param", [
    (TOOLS, None, None, "tool_choice"),  # auto by default: needs the server's flags
    (TOOLS, "auto", None, "tool_choice"),
    (None, "required", "hermes", "tool_choice"),
    ([], "auto", "hermes", "tool_choice"),
    (TOOLS, {"type": "function", "function": {"name": "missing"}}, "hermes", "tool_choice"),
    (TOOLS + TOOLS[:1], "required", "hermes", "tools"),
    ([ChatTool.model_validate({"type": "function", "function": {"name": "f", "strict": True}})], "auto", "mistral",
     "tools"),  # strict under auto: mistral's calls have no text trigger
])
def test_tool_choice_refusals_name_the_field(tools, choice, auto_parser, param):
    if isinstance(choice, dict):
        choice = NamedToolChoice.model_validate(choice)
    with pytest.raises(APIError) as err:
        tool_use(tools, choice, True, auto_parser)
    assert err.value.status == 400 and err.value.param == param


def test_tool_choice_none_and_auto_are_served():
    assert tool_use(None, None, True, None).mode == "none" and tool_use([], "none", True, None).tools is None
    assert tool_use(TOOLS, "none", True, None).mode == "none"
    auto = tool_use(TOOLS, None, False, "hermes")
    assert auto.mode == "auto" and not auto.parallel and auto.schema is None


# --- the chat message and its stream -----------------------------------------------------------
def _accumulate(deltas: list[dict]) -> dict:
    """What an OpenAI client rebuilds from a choice's deltas (tool calls by index, arguments appended)."""
    message: dict = {"content": "", "reasoning_content": "", "tool_calls": {}}
    for delta in deltas:
        message["content"] += delta.get("content", "")
        message["reasoning_content"] += delta.get("reasoning_content", "")
        for item in delta.get("tool_calls", []):
            call = message["tool_calls"].setdefault(item["index"], {"id": None, "name": "", "arguments": ""})
            call["id"] = item.get("id", call["id"])
            call["name"] += item.get("function", {}).get("name", "")
            call["arguments"] += item["function"].get("arguments", "")
    return message


def _stream_choice(output, pieces: list[str], finish: str) -> tuple[list[dict], str | None]:
    choice = output.stream()
    deltas = [choice.feed(p, i == len(pieces) - 1) for i, p in enumerate(pieces)]
    return [d for d in deltas if d], choice.finish_reason(finish)


@pytest.mark.parametrize("mode", ["auto", "required", "named"])
def test_chat_message_and_stream_agree(mode):
    parsing = ChatParsing("hermes", True)
    choice = {"auto": None, "required": "required",
              "named": NamedToolChoice.model_validate({"type": "function", "function": {"name": "get_weather"}})}[mode]
    output = parsing.output(tool_use(TOOLS, choice, True, parsing.auto_parser), True, "")
    text = {"auto": "Checking.\n" + _hermes("get_weather", {"city": "Oslo"}) + _hermes("now", {}),
            "required": json.dumps([{"name": "get_weather", "parameters": {"city": "Oslo"}},
                                    {"name": "now", "parameters": {}}]),
            "named": '{"city": "Oslo"}'}[mode]
    message, finish = output.message(text, "stop")
    assert finish == ("stop" if mode == "named" else "tool_calls")
    expected = [("get_weather", {"city": "Oslo"})] + ([("now", {})] if mode != "named" else [])
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == expected
    assert all(c["type"] == "function" and c["id"] for c in message["tool_calls"])
    assert message["content"] == ("Checking." if mode == "auto" else None) and "reasoning_content" not in message
    for pieces in chunkings(text, 10, seed=3):
        deltas, streamed_finish = _stream_choice(output, pieces, "stop")
        rebuilt = _accumulate(deltas)
        assert streamed_finish == finish and rebuilt["content"] == (message["content"] or "")
        assert [(c["name"], json.loads(c["arguments"])) for c in rebuilt["tool_calls"].values()] == expected
        assert all(c["id"] for c in rebuilt["tool_calls"].values())


def test_no_parsing_when_nothing_asks_for_it():
    assert ChatParsing().output(tool_use(None, None, True, None), True, "") is None
    assert ChatParsing("hermes", True).output(tool_use(TOOLS, "none", True, "hermes"), True, "") is None
    output = ChatParsing("hermes", True).output(tool_use(TOOLS, "auto", True, "hermes"), True, "")
    assert output.message("", "length") == ({"role": "assistant", "content": ""}, "length")
    assert output.message(_hermes("now", {}), "length")[1] == "length"  # cut off: not "tool_calls"


def test_server_options_are_checked_at_start():
    ChatParsing("mistral", True, "qwen3").check()
    for bad in [ChatParsing("nope"), ChatParsing(None, True), ChatParsing(None, False, "nope")]:
        with pytest.raises(ValueError):
            bad.check()


def test_the_request_gets_one_constraint():
    from tandem.server.constraints import Constraint
    from tandem.server.tools.protocol import ToolFields

    parsing = ChatParsing("hermes", True)
    tools = [t.model_dump() for t in TOOLS]
    required = parsing.request(ToolFields.model_validate({"tools": tools, "tool_choice": "required"}), None)
    assert required.constraint.kind == "json" and required.constraint.param == "tool_choice"
    assert required.constraint.value == required.use.schema and required.tools == required.use.tools
    own = Constraint("regex", "a+", "guided_regex")
    assert parsing.request(ToolFields.model_validate({"tools": tools}), own).constraint is own  # auto: the request's
    with pytest.raises(APIError) as err:
        parsing.request(ToolFields.model_validate({"tools": tools, "tool_choice": "required"}), own)
    assert err.value.param == "tool_choice" and "guided_regex" in err.value.message


STRICT_TOOLS = [ChatTool.model_validate({"type": "function", "function": {
    "name": "get_weather", "strict": True, "parameters": {"type": "object", "properties": {
        "city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"], "additionalProperties": False}}}),
    ChatTool.model_validate({"type": "function", "function": {"name": "loose"}})]


@pytest.mark.parametrize("parser, call, bad_call", [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}',
     '{"name": "get_weather", "parameters": {"town": "Paris"}}'),
])
def test_strict_tools_under_auto_constrain_the_calls_the_model_starts(parser, call, bad_call):
    """The structural tag the server sends for strict tools under "auto": free text, then calls in the
    parser's own format whose arguments follow the strict tool's schema (any object for the others);
    the parser reads what the grammar lets through."""
    import xgrammar as xgr

    use = tool_use(STRICT_TOOLS, "auto", True, parser)
    assert use.mode == "auto" and use.structural_tag is not None
    compiled = xgr.GrammarCompiler(xgr.TokenizerInfo([chr(c) for c in range(32, 127)] + ["\n"])).compile_structural_tag(
        json.dumps(use.structural_tag))

    def accepts(text: str) -> bool:
        return xgr.GrammarMatcher(compiled).accept_string(text)

    assert accepts("Let me check. " + call + " Done.") and accepts("No call needed.")
    assert not accepts("Sure: " + bad_call)  # a strict tool's arguments must follow its schema
    assert not accepts(call.replace("get_weather", "unknown"))  # only the request's functions
    assert accepts(call.replace("get_weather", "loose").replace('"Oslo"', "1").replace('"Paris"', "1"))
    (parsed,) = parse_tool_calls(tool_parser(parser), call)[1]
    assert parsed.name == "get_weather" and json.loads(parsed.arguments)["city"] in ("Paris", "Oslo")
