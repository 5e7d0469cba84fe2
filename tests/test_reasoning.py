"""Reasoning output: each parser splits templated outputs into reasoning and content, decided from the
end of the prompt (a template that opens <think>, or closes it when thinking is off); streamed in
random chunkings it gives the same split; with tool calls after the reasoning; include_reasoning."""
from __future__ import annotations

import json

import pytest

from chunking import chunkings
from tandem.server.chat_output import ChatParsing
from tandem.server.reasoning import REASONING_PARSERS, ReasoningStream, parse_reasoning, reasoning_parser
from tandem.server.tools.protocol import ChatTool
from tandem.server.tools.request import tool_use

QWEN3_PROMPT = "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n"
QWEN3_NO_THINKING = QWEN3_PROMPT + "<think>\n\n</think>\n\n"  # enable_thinking: false
THINKING_PROMPT = QWEN3_PROMPT + "<think>\n"  # Qwen3 thinking-2507, DeepSeek-R1 distills
R1_PROMPT = "<｜User｜>Why?<｜Assistant｜><think>\n"
THOUGHT = "Let me think: 2 + 2 = 4, so… the answer is \"4\".\nÜbrigens: 考える."

# (parser, prompt's end, output, reasoning, content)
CASES = [
    ("qwen3", QWEN3_PROMPT, f"<think>\n{THOUGHT}\n</think>\n\nThe answer is 4.", f"\n{THOUGHT}\n", "The answer is 4."),
    ("qwen3", QWEN3_PROMPT, "The answer is 4.", None, "The answer is 4."),
    ("qwen3", QWEN3_PROMPT, "\n<think>short</think>ok", "short", "ok"),
    ("qwen3", QWEN3_PROMPT, "<thinking> is a tag", None, "<thinking> is a tag"),
    ("qwen3", QWEN3_PROMPT, "<think>cut off in the mid", "cut off in the mid", ""),
    ("qwen3", QWEN3_NO_THINKING, "Just the answer.", None, "Just the answer."),
    ("qwen3", QWEN3_NO_THINKING, "I wrote </think> in text", None, "I wrote </think> in text"),
    ("qwen3", THINKING_PROMPT, f"{THOUGHT}\n</think>\n\nFour.", f"{THOUGHT}\n", "Four."),
    ("qwen3", THINKING_PROMPT, "<think>\n</think>\n\nEmpty thought.", "\n", "Empty thought."),  # as written
    ("deepseek_r1", R1_PROMPT, f"{THOUGHT}\n</think>\n\n**4**", f"{THOUGHT}\n", "**4**"),
    ("deepseek_r1", R1_PROMPT, f"<think>\n{THOUGHT}</think>Four", f"\n{THOUGHT}", "Four"),
    ("deepseek_r1", R1_PROMPT, "still thinking when max_tokens hit", "still thinking when max_tokens hit", ""),
    ("deepseek_r1", "<｜Assistant｜>", "no tag: r1 reasons first </think> answer", "no tag: r1 reasons first ",
     "answer"),
    ("deepseek_r1", QWEN3_NO_THINKING, "Answer without thinking.", None, "Answer without thinking."),
    ("deepseek_r1", R1_PROMPT, "a</think>b</think>c", "a", "b</think>c"),  # the first end closes it
]


def _split(name: str, tail: str, text: str) -> tuple[str | None, str]:
    parser = reasoning_parser(name)
    return parse_reasoning(parser, text, parser.opens_in_reasoning(tail))


@pytest.mark.parametrize("name, tail, text, reasoning, content", CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(CASES)])
def test_parsers_split_templated_outputs(name, tail, text, reasoning, content):
    assert _split(name, tail, text) == (reasoning, content)


@pytest.mark.parametrize("name, tail, text, reasoning, content", CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(CASES)])
def test_streamed_in_any_chunking_gives_the_same_split(name, tail, text, reasoning, content):
    parser = reasoning_parser(name)
    for pieces in chunkings(text, 25, seed=len(text)):
        stream = ReasoningStream(parser, parser.opens_in_reasoning(tail))
        got_r, got_c = "", ""
        for i, piece in enumerate(pieces):
            delta = stream.feed(piece, final=i == len(pieces) - 1)
            got_r, got_c = got_r + delta.reasoning, got_c + delta.content
        assert (got_r, got_c) == (reasoning or "", content), pieces


def test_reasoning_streams_as_it_comes():
    stream = ReasoningStream(reasoning_parser("deepseek_r1"), True)
    assert stream.feed("<thi").reasoning == ""  # might be the opening tag: held
    assert stream.feed("nk>First, ").reasoning == "First, "
    delta = stream.feed("done.</th")
    assert delta.reasoning == "done." and delta.content == ""  # might be the closing tag: held
    delta = stream.feed("ink>\n\nAns")
    assert delta.reasoning == "" and delta.content == "Ans"


def test_registry():
    assert set(REASONING_PARSERS) == {"deepseek_r1", "qwen3"}
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        reasoning_parser("nope")


TOOLS = [ChatTool.model_validate({"type": "function", "function": {"name": "lookup", "parameters": {}}})]
WITH_CALL = ('<think>\nI should look it up.\n</think>\n\n<tool_call>\n{"name": "lookup", "arguments": '
             '{"q": "ß"}}\n</tool_call>')


def test_tool_calls_after_reasoning_in_the_message_and_the_stream():
    parsing = ChatParsing("hermes", True, "qwen3")
    output = parsing.output(tool_use(TOOLS, None, True, parsing.auto_parser), True, QWEN3_PROMPT)
    message, finish = output.message(WITH_CALL, "stop")
    assert finish == "tool_calls" and message["content"] is None
    assert message["reasoning_content"] == "\nI should look it up.\n"
    assert [json.loads(c["function"]["arguments"]) for c in message["tool_calls"]] == [{"q": "ß"}]
    for pieces in chunkings(WITH_CALL, 10, seed=1):
        stream = output.stream()
        deltas = [stream.feed(p, i == len(pieces) - 1) for i, p in enumerate(pieces)]
        assert "".join(d.get("reasoning_content", "") for d in deltas) == message["reasoning_content"]
        assert "".join(d.get("content", "") for d in deltas) == ""
        assert [c["function"]["arguments"] for d in deltas for c in d.get("tool_calls", [])] == ['{"q": "ß"}']


def test_a_tool_call_written_inside_the_reasoning_is_not_a_call():
    parsing = ChatParsing("hermes", True, "deepseek_r1")
    output = parsing.output(tool_use(TOOLS, None, True, parsing.auto_parser), True, R1_PROMPT)
    thought = '<tool_call>{"name": "lookup", "arguments": {}}</tool_call>'
    message, finish = output.message(thought + "</think>fine", "stop")
    assert message == {"role": "assistant", "content": "fine", "reasoning_content": thought} and finish == "stop"


def test_include_reasoning_false_drops_it_and_keeps_the_content():
    output = ChatParsing(reasoning_parser="qwen3").output(tool_use(None, None, True, None), False, QWEN3_PROMPT)
    message, _ = output.message("<think>secret</think>Answer", "stop")
    assert message == {"role": "assistant", "content": "Answer", "reasoning_content": None}
    assert [output.stream().feed("<think>secret</think>Answer", True)] == [{"content": "Answer"}]


def test_only_reasoning_gives_content_none_and_nothing_gives_empty_content():
    output = ChatParsing(reasoning_parser="deepseek_r1").output(tool_use(None, None, True, None), True, R1_PROMPT)
    assert output.message("thinking...", "length")[0] == {"role": "assistant", "content": None,
                                                          "reasoning_content": "thinking..."}
    assert output.message("", "length")[0] == {"role": "assistant", "content": "", "reasoning_content": None}
