"""Fuzzed API: schemathesis generates requests from the server's own /openapi.json (valid ones,
invalid ones, and valid ones steered past the model-name and unsupported-field checks so they reach
the engine), then hand-written hostile bodies. No response may be a 5xx, every error has OpenAI's
shape with no traceback or path, the server stays healthy and ends at rest (nothing running, no KV
block held, no per-request state left in the API process).

Bounded: a fixed number of examples per operation and mode (derandomized, so CI runs the same cases
every time), and max_model_len 64 so no generation takes long."""
from __future__ import annotations

import json
import time

import httpx
import pytest
import schemathesis  # the test extra has it: a missing install fails here, it does not skip
from hypothesis import HealthCheck, Phase, given, settings

from reliability_utils import assert_at_rest, assert_error_body, check_response, record
from server_utils import ServerProcess

KEY = "fuzz-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 1024 * 1024
EXAMPLES = {"positive": 40, "negative": 40, "steered": 80}
UNSUPPORTED = ("presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "min_tokens",
               "best_of", "echo", "logprobs", "top_logprobs", "suffix", "tools", "response_format")


@pytest.fixture(scope="module")
def fuzz_server(checkpoint_dir):
    proc = ServerProcess("--model", str(checkpoint_dir("llama")), "--served-model-name", "tiny",
                         "--max-model-len", "64", "--max-num-seqs", "4", "--max-num-waiting", "8", "--api-key", KEY,
                         "--max-request-bytes", str(MAX_BODY))
    yield proc
    assert proc.stop() == 0, proc.log()


def _steer(body: dict) -> dict:
    """Past the checks that would refuse most generated bodies, so the engine itself gets fuzzed
    (prompts, stop strings, stream options, n): the served model, no unsupported field, sampling
    values in range, few tokens."""
    body = {k: v for k, v in body.items() if k not in UNSUPPORTED}
    body["model"] = "tiny"
    body["max_tokens"] = 1 + abs(body["max_tokens"]) % 6 if isinstance(body.get("max_tokens"), int) else 4
    body.pop("max_completion_tokens", None)
    if isinstance(body.get("n"), int):
        body["n"] = 1 + abs(body["n"]) % 3
    for name, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.05, 1.0), ("min_p", 0.0, 1.0)):
        if isinstance(body.get(name), (int, float)) and not low <= body[name] <= high:
            body[name] = high
    if isinstance(body.get("top_k"), int) and body["top_k"] < -1:
        body["top_k"] = -1
    return body


def _strategy(operation, mode: str):
    gen = schemathesis.GenerationMode.NEGATIVE if mode == "negative" else schemathesis.GenerationMode.POSITIVE
    strategy = operation.as_strategy(generation_mode=gen)
    if mode != "steered":
        return strategy

    def steer(case):
        if isinstance(case.body, dict):
            case.body = _steer(case.body)
        return case

    return strategy.map(steer)


def _fuzz(server: ServerProcess, operation, mode: str, statuses: dict[int, int]) -> int:
    count = [0]

    @settings(max_examples=EXAMPLES[mode], deadline=None, database=None, derandomize=True, print_blob=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    @given(case=_strategy(operation, mode))
    def run(case) -> None:
        response = case.call(base_url=server.url, headers=HEADERS, timeout=60)
        streamed = isinstance(case.body, dict) and case.body.get("stream") is True
        check_response(response.status_code, response.text, streamed)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        count[0] += 1

    run()
    return count[0]


def _operations(server: ServerProcess) -> list:
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    if hasattr(schema.config, "max_stream_events"):
        # schemathesis stops reading an event stream after 20 events by default; our streams end (at
        # most max_model_len tokens), and the check is that each one ends with [DONE]
        schema.config.max_stream_events = 10_000
    return [result.ok() for result in schema.get_all_operations()]


def test_schemathesis_finds_no_5xx_and_no_leak(fuzz_server):
    start = time.monotonic()
    cases: dict[str, int] = {}
    statuses: dict[int, int] = {}
    for op in _operations(fuzz_server):
        has_body = op.method.upper() == "POST"
        modes = ["positive", "negative"] if has_body else ["positive"]  # GETs take no input to corrupt
        if op.path.endswith("completions"):
            modes.append("steered")
        for mode in modes:
            cases[f"{op.method.upper()} {op.path} {mode}"] = _fuzz(fuzz_server, op, mode, statuses)
    total = sum(cases.values())
    record("schemathesis", cases=total, by_operation=cases, statuses=statuses,
           seconds=round(time.monotonic() - start, 1))
    assert total >= 400 and statuses.get(200, 0) >= 50  # the steered cases reached the engine
    assert_at_rest(fuzz_server.url)


# --- hand-written hostile bodies -----------------------------------------------------------------
def _deep(depth: int) -> bytes:
    return b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"


HOSTILE: list[tuple[str, str | bytes | dict, int]] = [
    # (route, body, expected status); bytes are sent as they are
    ("/v1/completions", {"prompt": "x" * (10 * 1024 * 1024)}, 413),  # a 10 MB prompt
    ("/v1/completions", {"prompt": [[7] * 1000] * 2000}, 413),  # 2M token ids
    ("/v1/completions", {"prompt": "the cat " * 20_000, "max_tokens": 2}, 400),  # huge, under the cap
    ("/v1/completions", {"prompt": "hi", "stop": ["ab"] * 50_000, "max_tokens": 2}, 400),  # over max_stop_strings
    ("/v1/completions", {"prompt": "hi", "stop": ["ab" * 512] * 64, "max_tokens": 2}, 200),  # at the caps
    ("/v1/completions", {"prompt": "hi", "user": "u" * 500_000, "max_tokens": 2}, 200),
    ("/v1/completions", _deep(100_000), 400),
    ("/v1/completions", _deep(200), 400),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 2' + b', "x": {"y": [1, {"z": []}]}' * 5000 + b"}", 200),
    ("/v1/completions", b'{"prompt": "\\ud800"}', 400),  # a lone surrogate
    ("/v1/completions", b'{"prompt": "hi", "stop": "\\udfff"}', 400),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udbff"}]}', 400),
    ("/tokenize", b'{"prompt": "\\ud83d"}', 400),
    ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', 400),
    ("/v1/completions", b'{"prompt": "hi", "top_p": Infinity}', 400),
    ("/v1/completions", b'{"prompt": "hi", "temperature": 1e999}', 400),
    ("/v1/completions", b"\xff\xfe\x00garbage", 400),
    ("/v1/completions", b"", 400),
    ("/v1/completions", b"null", 400),
    ("/v1/completions", b'"a string"', 400),
    ("/v1/completions", b'{"prompt": "hi"} trailing', 400),
    ("/v1/completions", {"prompt": 12}, 400),
    ("/v1/completions", {"prompt": {"a": 1}}, 400),
    ("/v1/completions", {"prompt": [1, "two"]}, 400),
    ("/v1/completions", {"prompt": [[1], [2, [3]]]}, 400),
    ("/v1/completions", {"prompt": "hi", "max_tokens": [1]}, 400),
    ("/v1/completions", {"prompt": "hi", "stream": {"a": 1}}, 400),
    ("/v1/completions", {"prompt": "hi", "n": 10**30}, 400),
    ("/v1/completions", {"prompt": "hi", "n": -1}, 400),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -(10**30)}, 400),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**30}, 400),
    ("/v1/completions", {"prompt": "hi", "top_k": 2**63}, 400),  # killed the engine core before
    ("/v1/completions", {"prompt": "hi", "top_k": 10**40}, 400),
    ("/v1/completions", {"prompt": "hi", "seed": 2**64}, 400),
    ("/v1/completions", {"prompt": "hi", "seed": -(2**63), "max_tokens": 2}, 200),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [2**63]}, 400),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [10**40]}, 400),
    ("/v1/completions", {"prompt": "hi", "temperature": 1e308, "max_tokens": 2}, 200),
    ("/v1/completions", {"prompt": "hi", "temperature": -1e308}, 400),
    ("/v1/completions", {"prompt": "hi", "top_p": 5e-324, "max_tokens": 2}, 200),
    ("/v1/completions", {"prompt": [-1]}, 400),
    ("/v1/completions", {"prompt": [2**63]}, 400),
    ("/v1/completions", {"prompt": "\u0000\u202e\ufeff\u200b\U0010ffff\U0001f600e\u0301", "max_tokens": 3}, 200),
    ("/v1/completions", {"prompt": "\U0001f600" * 10, "stop": ["\U0001f600", "\u0301"], "max_tokens": 3,
                         "stream": True}, 200),
    ("/v1/completions", {"prompt": "hi", "model": "\u202e\U0010ffff" * 1000}, 404),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\u0000" * 10}], "max_tokens": 2}, 200),
    ("/v1/chat/completions", {"messages": [{"role": "user" * 10_000, "content": "x"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400),
    ("/v1/chat/completions", {"messages": "hello"}, 400),
    ("/v1/chat/completions", {"messages": [None]}, 400),
    ("/tokenize", {"prompt": "x" * 100_000}, 200),
    ("/detokenize", {"tokens": [10**40]}, 400),
    ("/detokenize", {"tokens": [0, 1, 2, 3] * 10_000}, 200),
]


@pytest.mark.parametrize("route, body, status", HOSTILE, ids=[f"{i}-{r}" for i, (r, _, _) in enumerate(HOSTILE)])
def test_hostile_bodies_get_clean_answers(fuzz_server, route, body, status):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = httpx.post(fuzz_server.url + route, content=content, timeout=60,
                      headers={**HEADERS, "Content-Type": "application/json"})
    check_response(resp.status_code, resp.text, streamed=isinstance(body, dict) and body.get("stream") is True)
    assert resp.status_code == status, resp.text[:300]
    if status >= 400:
        assert_error_body(resp.text)
    assert httpx.get(fuzz_server.url + "/health", timeout=5).status_code == 200


def test_the_server_is_at_rest_after_the_hostile_bodies(fuzz_server):
    assert_at_rest(fuzz_server.url)
    record("hostile_bodies", cases=len(HOSTILE))
