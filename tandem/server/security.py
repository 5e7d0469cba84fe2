"""The API key check and CORS.

The key is compared in constant time: both sides are hashed to fixed-length digests first, so
``hmac.compare_digest`` takes the same time whatever the given key's length or first differing
byte. CORS is off unless ``--allowed-origins`` names origins: a browser page on another origin then
cannot read any response (the default for a server meant for programs, not pages)."""
from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from starlette.middleware.cors import CORSMiddleware

from tandem.server.errors import APIError


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def keys_match(given: bytes, expected_digest: bytes) -> bool:
    return hmac.compare_digest(_digest(given), expected_digest)


def api_key_check(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency: 401 unless ``Authorization: Bearer <api_key>`` (no-op without a key)."""
    expected = _digest(f"Bearer {api_key}".encode()) if api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode("utf-8", "surrogateescape")
        if not keys_match(given, expected):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    return check


def install_cors(app: FastAPI, allowed_origins: list[str] | None) -> None:
    """Answer cross-origin requests only from these origins ("*": any); nothing otherwise."""
    if not allowed_origins:
        return
    app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["GET", "POST", "OPTIONS"],
                       allow_headers=["*"], allow_credentials=False)
