"""Security defaults: loopback only unless told otherwise, the API key compared in constant time, a
request body cap answered with 413 in OpenAI's shape, CORS off unless origins are given, and no
traceback or file path in an error body even for an unexpected exception (the fuzz tests check the
same for every response they get).

The live checks use the session's test server; the CORS-on and unexpected-error cases run the app
in-process (no engine behind it) through httpx's ASGI transport."""
from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from reliability_utils import assert_error_body
from server_utils import SERVER_KEY
from tandem.cli import build_parser, main
from tandem.server import security
from tandem.server.app import create_app
from tandem.server.defaults import DEFAULT_MAX_REQUEST_BYTES
from tandem.server.metrics import ServerMetrics

AUTH = {"Authorization": f"Bearer {SERVER_KEY}"}


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket listening on ``port`` (/proc/net/tcp and tcp6)."""
    found = set()
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_the_server_listens_on_loopback_only_by_default(server):
    args = build_parser().parse_args(["serve", "--model", "x"])
    assert args.host == "127.0.0.1" and args.allowed_origins is None
    assert args.max_request_bytes == DEFAULT_MAX_REQUEST_BYTES
    port = int(server.url.rsplit(":", 1)[1])
    assert _listening_addresses(port) == {"0100007F"}  # 127.0.0.1, and no wildcard listener


def test_the_api_key_is_compared_in_constant_time(monkeypatch):
    calls = []
    real = security.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", spy)
    expected = hashlib.sha256(b"secret-key").digest()
    given = [b"secret-key", b"secret-kez", b"secret", b"secret-key-and-more", b"", b"x" * 10_000]
    assert [security.keys_match(g, expected) for g in given] == [True] + [False] * 5
    assert calls == [(32, 32)] * len(given)  # fixed-length digests: no length or prefix shortcut


def test_bodies_over_the_cap_get_413_in_the_error_shape(server):
    over = b'{"prompt": "' + b"x" * DEFAULT_MAX_REQUEST_BYTES + b'"}'
    declared = httpx.post(server.url + "/v1/completions", content=over, timeout=30,
                          headers={**AUTH, "Content-Type": "application/json"})
    assert declared.status_code == 413
    assert "--max-request-bytes" in assert_error_body(declared.text)["error"]["message"]

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(DEFAULT_MAX_REQUEST_BYTES // 65536 + 1):
            yield b"y" * 65536
        yield b'"}'

    chunked = httpx.post(server.url + "/tokenize", content=chunks(), timeout=30,
                         headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413
    assert_error_body(chunked.text)
    under = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": [5] * 300_000}, timeout=60,
                       headers=AUTH)
    assert under.status_code == 400 and "maximum context length" in under.json()["error"]["message"]
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200


def test_cli_refuses_bad_limits(capsys):
    assert main(["serve", "--model", "random:tiny", "--max-request-bytes", "0"]) == 2
    assert "--max-request-bytes" in capsys.readouterr().err
    assert main(["serve", "--model", "random:tiny", "--core-timeout", "-1"]) == 2
    assert "--core-timeout" in capsys.readouterr().err


def _preflight(origin: str) -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"}


def test_cors_is_off_by_default(server):
    pre = httpx.options(server.url + "/v1/completions", headers=_preflight("http://evil.example"), timeout=5)
    assert "access-control-allow-origin" not in pre.headers
    health = httpx.get(server.url + "/health", headers={"Origin": "http://evil.example"}, timeout=5)
    assert health.status_code == 200 and "access-control-allow-origin" not in health.headers


class _StubClient:
    """What the routes read of an EngineClient, with no engine behind it."""

    failure = None
    alive = True
    max_model_len = 64
    tokenizer = None
    routes: dict = {}
    output_processor = SimpleNamespace(requests={})
    metrics = ServerMetrics("stub")

    def health_problem(self) -> None:
        return None

    @property
    def model_config(self):
        raise RuntimeError(f"cannot read {Path(__file__).resolve()} (a path that must not reach a client)")


def _call(app, method: str, path: str, headers: dict[str, str], content: bytes | None = None) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            return await http.request(method, path, headers=headers, content=content)

    return asyncio.run(go())


def test_cors_answers_only_the_origins_given():
    app = create_app(_StubClient(), ["stub"], "/models/stub", None, allowed_origins=["http://app.example"])
    ok = _call(app, "OPTIONS", "/v1/completions", _preflight("http://app.example"))
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://app.example"
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    other = _call(app, "OPTIONS", "/v1/completions", _preflight("http://evil.example"))
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    simple = _call(app, "GET", "/health", {"Origin": "http://app.example"})
    assert simple.headers["access-control-allow-origin"] == "http://app.example"


def test_an_unexpected_exception_answers_500_without_internals(caplog):
    app = create_app(_StubClient(), ["stub"], "/models/stub", "k")
    resp = _call(app, "GET", "/v1/models", {"Authorization": "Bearer k"})
    assert resp.status_code == 500
    message = assert_error_body(resp.text)["error"]["message"]
    assert message == "internal error (RuntimeError); see the server log"
    assert "must not reach a client" in caplog.text  # the details go to the log instead


@pytest.mark.parametrize("key", [None, "wrong"])
def test_a_missing_or_wrong_key_gets_401(key):
    app = create_app(_StubClient(), ["stub"], "/models/stub", "k")
    resp = _call(app, "GET", "/v1/models", {} if key is None else {"Authorization": f"Bearer {key}"})
    assert resp.status_code == 401 and assert_error_body(resp.text)["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("header, status", [
    ("Bearer k", 400), ("bearer k", 400), ("BEARER k", 400), ("bEaReR  k", 400),  # the scheme's case is free
    ("Bearer K", 401), ("Bearer k ", 401), ("Basic k", 401), ("Bearerk", 401), ("k", 401), ("", 401)])
def test_the_bearer_scheme_is_case_insensitive_and_the_key_is_not(header, status):
    app = create_app(_StubClient(), ["stub"], "/models/stub", "k")
    resp = _call(app, "POST", "/v1/completions", {"Authorization": header, "Content-Type": "application/json"},
                 b'{"prompt": ')  # malformed: a request that gets past the key is answered 400
    assert resp.status_code == status, resp.text
    assert_error_body(resp.text)


@pytest.mark.parametrize("body", [b'{"prompt": ', b"\xff\xfe", b'{"prompt": "x", "stream": "yes"}', b"x" * 2_000_000])
def test_a_v1_request_without_the_key_gets_401_whatever_its_body(body):
    """The key is checked before the body is read: malformed, wrongly typed or oversized, no key is 401."""
    app = create_app(_StubClient(), ["stub"], "/models/stub", "k", max_request_bytes=1_000_000)
    headers = {"Content-Type": "application/json"}
    resp = _call(app, "POST", "/v1/completions", headers, body)
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
    assert assert_error_body(resp.text)["error"]["code"] == "invalid_api_key"
    with_key = _call(app, "POST", "/v1/completions", {**headers, "Authorization": "Bearer k"}, body)
    assert with_key.status_code == (413 if len(body) > 1_000_000 else 400)
    assert _call(app, "POST", "/v1/anything", headers, body).status_code == 401  # unknown /v1 routes too


def test_the_live_server_takes_a_lowercase_bearer(server):
    resp = httpx.get(server.url + "/v1/models", headers={"Authorization": f"bearer {SERVER_KEY}"}, timeout=10)
    assert resp.status_code == 200 and resp.json()["data"][0]["id"] == "tiny"
    refused = httpx.post(server.url + "/v1/completions", content=b"{", timeout=10,
                         headers={"Content-Type": "application/json"})
    assert refused.status_code == 401
