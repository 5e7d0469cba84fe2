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


def test_the_handler_gets_the_first_token_then_every_interval_then_the_last():
    from types import SimpleNamespace

    from tandem.server.client import EngineClient, _Route

    client = SimpleNamespace(stream_interval=INTERVAL)
    route = _Route(handle=None, index=0, arrival=0.0, core=None, prompt_tokens=5)  # type: ignore[arg-type]

    def output(tokens: int, finished: bool = False):
        return SimpleNamespace(outputs=[SimpleNamespace(token_ids=list(range(tokens)))], finished=finished)

    given = [t for t in range(1, 12) if EngineClient._due(client, route, output(t))]
    assert given == [1, 5, 9]
    assert EngineClient._due(client, route, output(11, finished=True))  # the last, whatever the interval
    assert EngineClient._due(SimpleNamespace(stream_interval=1), _Route(None, 0, 0.0, None, 5), output(1))


def test_an_interval_below_one_is_refused_naming_the_flag():
    from tandem.server.options import ServeOptions

    with pytest.raises(ValueError, match="--stream-interval must be >= 1"):
        ServeOptions(stream_interval=0)
