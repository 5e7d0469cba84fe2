"""Fuzzed API: schemathesis generates requests from the server's own /openapi.json, every operation,
valid (positive) and invalid (negative) bodies, and runs all of its checks on every response: no 5xx;
status codes, media types, headers and bodies as documented; schema-valid requests accepted and
schema-invalid ones refused; the API key enforced where the schema says so. Then hand-written hostile
bodies. Every error has OpenAI's shape with no traceback or path, and the server stays healthy and ends
at rest (nothing running, no KV block held, no per-request state left in the API process).

Rules of the server no JSON schema can state are applied to the positive cases before they are
sent (``_fit``): a prompt's tokens plus ``max_tokens`` fit the context (a schema cannot count a
string's tokens), ``min_tokens`` is at most ``max_tokens``, and prompts x ``n`` is at most what the
server can hold (a schema cannot compare or multiply two fields). ``max_tokens``, ``min_tokens`` and
``n`` are lowered within their documented ranges to fit; a case whose prompt alone fills the context
is left out. Fields whose validity is another program's to judge are dropped: ``bad_words`` (their
tokens must be in the model's vocabulary: the tokenizer decides) and the constraints xgrammar must
parse (JSON schemas, regexes, grammars, structural tags); of the constraints that always parse
(``guided_choice``, a ``json_object`` response format) one is kept, without ``min_tokens``,
``allowed_token_ids`` or ``bad_words`` (with a constraint they may leave no token to sample, which
ends the request with a 400 while it generates). ``tools`` and ``tool_choice`` are dropped too: what they may be
depends on each other (a named function must be among the tools) and on the server's
``--enable-auto-tool-choice``. The cases stay schema-valid, and the checks are all on.

Bounded: a fixed number of examples per operation and mode (derandomized, so CI runs the same cases
every time), max_model_len 64 and --max-n 4 so no generation takes long, and a deadline on the whole run."""
from __future__ import annotations

import json
import time

import httpx
import pytest
import schemathesis  # the test extra has it: a missing install fails here, it does not skip
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import CHECKS, load_all_checks

from reliability_utils import assert_at_rest, assert_error_body, check_response, record
from server_utils import ServerProcess

KEY = "fuzz-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 1024 * 1024
MAX_MODEL_LEN = 64
MAX_NUM_SEQS, MAX_NUM_WAITING = 4, 8  # a request may make at most 12 sequences (prompts x n)
MAX_N = 4
EXAMPLES = {"positive": 40, "negative": 40}
GENERATING = ("/v1/completions", "/v1/chat/completions")  # twice the positive cases: they reach the engine
DEADLINE_S = 120  # the whole schemathesis run: about 40 s on a 2-core machine shared with other work


@pytest.fixture(scope="module")
def fuzz_server(checkpoint_dir):
    proc = ServerProcess("--model", str(checkpoint_dir("llama")), "--served-model-name", "tiny",
                         "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(MAX_NUM_SEQS),
                         "--max-num-waiting", str(MAX_NUM_WAITING),
                         "--max-n", str(MAX_N), "--api-key", KEY, "--max-request-bytes", str(MAX_BODY))
    yield proc
    assert proc.stop() == 0, proc.log()


def _prompt_lengths(server: ServerProcess, path: str, body: dict) -> list[int] | None:
    """Each prompt's tokens as the server counts them (its /tokenize); None if it cannot tell."""
    if path.endswith("chat/completions"):
        inputs = [{"messages": body.get("messages")}]
    else:
        prompt = body.get("prompt")
        many = isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list))  # a batch of prompts
        inputs = [{"prompt": p} if isinstance(p, str) else p for p in (prompt if many else [prompt])]
    lengths = []
    for item in inputs:
        if isinstance(item, list):
            lengths.append(len(item))
            continue
        resp = httpx.post(server.url + "/tokenize", json=item, timeout=30)
        if resp.status_code != 200:
            return None
        lengths.append(resp.json()["count"])
    return lengths


_PARSED = ("bad_words", "guided_json", "guided_regex", "guided_grammar", "structured_outputs", "structural_tag", "tools",
           "tool_choice")


def _drop_parsed_fields(body: dict) -> None:
    """The fields another program judges (see the module's doc), and what a constraint refuses beside it."""
    for name in _PARSED:
        body.pop(name, None)
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_schema", "structural_tag"):
        del body["response_format"]
    json_object = isinstance(body.get("response_format"), dict) and body["response_format"].get("type") == "json_object"
    if json_object and body.get("guided_choice") is not None:
        del body["guided_choice"]
    if json_object or body.get("guided_choice") is not None:
        body.pop("allowed_token_ids", None)
        if body.get("min_tokens"):
            body["min_tokens"] = 0


def _fit(server: ServerProcess, path: str, body: dict) -> dict | None:
    """``body`` with max_tokens, min_tokens and n lowered to fit the context and the server's capacity;
    None if its prompt alone fills the context."""
    _drop_parsed_fields(body)
    lengths = _prompt_lengths(server, path, body)
    if lengths is None or max(lengths) >= MAX_MODEL_LEN:
        return None
    room = MAX_MODEL_LEN - max(lengths)
    if isinstance(body.get("n"), (int, float)) and len(lengths) * body["n"] > MAX_NUM_SEQS + MAX_NUM_WAITING:
        body["n"] = (MAX_NUM_SEQS + MAX_NUM_WAITING) // len(lengths)
    chat = path.endswith("chat/completions")
    names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    name = next((n for n in names if body.get(n) is not None), None)  # the one the server reads
    limit = body[name] if name else (None if chat or "max_tokens" in body else 16)  # 16: completions' default
    if limit is None:  # up to the context: fits whatever the prompt
        return body
    if limit > room:
        body[name or "max_tokens"] = limit = room
    if isinstance(body.get("min_tokens"), (int, float)) and body["min_tokens"] > limit:
        body["min_tokens"] = limit
    return body


def _strategy(server: ServerProcess, operation, mode: str):
    gen = schemathesis.GenerationMode.NEGATIVE if mode == "negative" else schemathesis.GenerationMode.POSITIVE
    strategy = operation.as_strategy(generation_mode=gen)
    if mode == "negative" or operation.path not in GENERATING:
        return strategy

    def fit(case):
        case.body = _fit(server, operation.path, case.body)
        return case

    return strategy.map(fit).filter(lambda case: case.body is not None)


def _fuzz(server: ServerProcess, operation, mode: str, statuses: dict[int, int]) -> int:
    count = [0]
    examples = EXAMPLES[mode] * (2 if mode == "positive" and operation.path in GENERATING else 1)

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True, print_blob=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    @given(case=_strategy(server, operation, mode))
    def run(case) -> None:
        response = case.call_and_validate(base_url=server.url, headers=HEADERS, timeout=60)
        streamed = isinstance(case.body, dict) and case.body.get("stream") is True
        check_response(response.status_code, response.text, streamed)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        count[0] += 1

    run()
    return count[0]


def _schema(server: ServerProcess):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    # every check schemathesis has (the CLI's --checks all): none is left to its default
    load_all_checks()
    schema.config.checks.update(included_check_names=["all"])
    assert all(schema.config.checks.get_by_name(name=name).enabled for name in CHECKS.get_all_names())
    # schemathesis stops reading an event stream after 20 events by default; our streams end (at
    # most max_model_len tokens), and the check is that each one ends with [DONE]
    schema.config.max_stream_events = 10_000
    return schema


def test_schemathesis_finds_no_failure(fuzz_server):
    start = time.monotonic()
    cases: dict[str, int] = {}
    statuses: dict[int, int] = {}
    seconds: dict[str, float] = {}
    for result in _schema(fuzz_server).get_all_operations():
        op = result.ok()
        modes = ["positive", "negative"] if op.method.upper() == "POST" else ["positive"]  # GETs take no input
        for mode in modes:
            began = time.monotonic()
            cases[f"{op.method.upper()} {op.path} {mode}"] = _fuzz(fuzz_server, op, mode, statuses)
            seconds[f"{op.method.upper()} {op.path} {mode}"] = round(time.monotonic() - began, 1)
            assert time.monotonic() - start < DEADLINE_S, (cases, seconds)
    total = sum(cases.values())
    record("schemathesis", cases=total, by_operation=cases, seconds_by_operation=seconds, statuses=statuses,
           seconds=round(time.monotonic() - start, 1))
    assert total >= 400 and statuses.get(200, 0) >= 100  # the positive cases reached the engine
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
    # infinite as a float32, it made a grammar's banned logits NaN, and a banned token was drawn (a 500)
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "0"}], "guided_choice": ["ab", "cd"],
                              "temperature": 2.4e250, "min_p": 0.4, "max_tokens": 4}, 200),
    ("/v1/completions", {"prompt": "hi", "temperature": -1e308}, 400),
    ("/v1/completions", {"prompt": "hi", "top_p": 5e-324, "max_tokens": 2}, 200),
    # a repetition penalty that is 0 as a float32 made logits infinite: refused; the least one taken,
    # sampling under a grammar (which rejected the token drawn from NaNs: a 500 before)
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "0"}], "guided_choice": ["0"],
                              "repetition_penalty": 5e-324, "temperature": 1.0}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "0"}], "guided_choice": ["0"],
                              "repetition_penalty": 1e-6, "temperature": 1.0, "max_tokens": 4}, 200),
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
