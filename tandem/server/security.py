"""The API key check and CORS.

The key is checked by an ASGI middleware, before routing and before the body is read: a ``/v1``
request without the key gets 401 whatever its body holds. It is compared in constant time: both
sides are hashed to fixed-length digests first, so ``hmac.compare_digest`` takes the same time
whatever the given key's length or first differing byte.

CORS is off unless ``--allowed-origins`` names origins: a browser page on another origin then cannot
read any response (the default for a server meant for programs, not pages). When on, it runs before
the key check, so preflights (which carry no key) are answered and a 401 carries its headers."""
from __future__ import annotations

import hashlib
import hmac

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from tandem.server.errors import error_response


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def keys_match(given: bytes, expected_digest: bytes) -> bool:
    return hmac.compare_digest(_digest(given), expected_digest)


API_KEY_PREFIX = "/v1"  # the paths that need the key (health probes, metrics, tokenizer routes do not)
_REFUSAL = "invalid or missing API key (send 'Authorization: Bearer <key>')"


def bearer_token(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The credentials of ``Authorization: Bearer <token>``; the scheme's case does not matter
    (RFC 9110: auth schemes are case-insensitive)."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.lstrip(b" ") if scheme.lower() == b"bearer" else None
    return None


def needs_key(path: str) -> bool:
    return path == API_KEY_PREFIX or path.startswith(API_KEY_PREFIX + "/")


class APIKeyMiddleware:
    """401 for a ``/v1`` request without the key, before the app reads a byte of its body: a
    client without the key learns nothing from the server's answer to its body."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = _digest(api_key.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and needs_key(scope["path"]):
            token = bearer_token(scope["headers"])
            if token is None or not keys_match(token, self.expected):
                refusal = error_response(401, _REFUSAL, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


def install_api_key(app: FastAPI, api_key: str | None) -> None:
    """Require ``Authorization: Bearer <api_key>`` on the ``/v1`` routes (nothing without a key)."""
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)


def install_cors(app: FastAPI, allowed_origins: list[str] | None) -> None:
    """Answer cross-origin requests only from these origins ("*": any); nothing otherwise."""
    if not allowed_origins:
        return
    app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["GET", "POST", "OPTIONS"],
                       allow_headers=["*"], allow_credentials=False)
