"""``--stream-interval N``: a stream's events after the first token carry at least N new tokens (the
last may carry fewer), and the streamed text and tokens equal the unstreamed response's."""
from __future__ import annotations

import json

import httpx
import pytest

from server_utils import ServerProcess

INTERVAL = 4


@pytest.fixture(scope="module")
def server():
    proc = ServerProcess("--model", "random:tiny", "--device", "cpu", "--dtype", "float32", "--max-model-len", "256",
                         "--stream-interval", str(INTERVAL))
    yield proc
    proc.stop()


def _body(n: int, max_tokens: int, stream: bool) -> dict:
    return {"model": "random:tiny", "prompt": [5, 9, 200, 31, 7], "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "n": n, "stream": stream, "return_token_ids": True}


def _stream(url: str, body: dict) -> list[dict]:
    chunks = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


@pytest.mark.parametrize("n, max_tokens", [(1, 23), (2, 9)])
def test_events_carry_the_interval_and_the_text_is_the_unstreamed_one(server, n, max_tokens):
    plain = httpx.post(server.url + "/v1/completions", json=_body(n, max_tokens, False), timeout=60).json()
    chunks = _stream(server.url, _body(n, max_tokens, True))
    for index in range(n):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        sizes = [len(c.get("token_ids") or []) for c in mine]
        # the first event may hold more than the first token: a handler that reads late gets what queued up
        assert sum(sizes) == max_tokens and sizes[0] >= 1 and len(sizes) <= 2 + max_tokens // INTERVAL
        assert all(size >= INTERVAL for size in sizes[1:-1]), sizes
        want = next(c for c in plain["choices"] if c["index"] == index)
        assert "".join(c["text"] for c in mine) == want["text"]
        assert [t for c in mine for t in c.get("token_ids") or []] == want["token_ids"]


def test_a_stream_gets_its_first_token_then_every_interval_then_the_last():
    import random

    from tandem.engine.output_processor import OutputProcessor
    from tandem.engine.scheduler import StepDeltas
    from tandem.sampling_params import SamplingParams
    from tandem.tokenizer import ByteTokenizer

    rng = random.Random()
    ids = [rng.randrange(32, 127) for _ in range(11)]
    proc = OutputProcessor(ByteTokenizer(), stream_interval=INTERVAL)
    proc.add("s", None, [1], SamplingParams(max_tokens=20), stream=True)
    proc.add("plain", None, [1], SamplingParams(max_tokens=20), stream=False)
    given = []
    for i, token in enumerate(ids, start=1):
        outs = proc.process(StepDeltas(["s", "plain"], [token, token])).outputs
        assert [o.request_id for o in outs] in ([], ["s"])  # an unstreamed request only when it ends
        given += [i] * len(outs)
    assert given == [1, 5, 9]
    last = proc.process(StepDeltas(finished={"s": "length", "plain": "length"})).outputs
    assert [(o.request_id, o.finished, len(o.outputs[0].token_ids)) for o in last] == [("s", True, 11), ("plain", True, 11)]
    one = OutputProcessor(ByteTokenizer())  # the default: every token
    one.add("s", None, [1], SamplingParams(max_tokens=20), stream=True)
    assert all(len(one.process(StepDeltas(["s"], [t])).outputs) == 1 for t in ids)


def test_an_interval_below_one_is_refused_naming_the_flag():
    from tandem.server.options import ServeOptions

    with pytest.raises(ValueError, match="--stream-interval must be >= 1"):
        ServeOptions(stream_interval=0)
