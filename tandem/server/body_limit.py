"""Caps on the request body, answered in OpenAI's error shape: its size (``--max-request-bytes``, 413)
and the time the client takes to send it (``--request-read-timeout``, 408, and the connection is
closed: a client that trickles its body in must not hold a connection and its buffer for ever).

A declared ``Content-Length`` over the size cap is refused before a byte of the body is read; a
chunked body is counted as it arrives and refused as soon as it crosses the cap. The deadline runs
from the moment the headers are in (the ASGI call) until the last body chunk; reads after that (the
disconnect watch of a streaming response) wait as long as they need."""
from __future__ import annotations

import asyncio

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tandem.server.defaults import DEFAULT_REQUEST_READ_TIMEOUT_S
from tandem.server.errors import error_response


class BodyRefused(HTTPException):
    """Raised from ``receive`` mid-body; FastAPI re-raises HTTPExceptions met while reading a body,
    and the app's handler answers it in the error shape (with these headers)."""


class BodyTooLarge(BodyRefused):
    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large_message(limit))


class BodyTooSlow(BodyRefused):
    def __init__(self, timeout_s: float) -> None:
        super().__init__(408, f"the request body did not arrive within this server's limit of {timeout_s:g} s "
                              "(--request-read-timeout)", headers={"Connection": "close"})


def too_large_message(limit: int) -> str:
    return f"the request body is larger than this server's limit of {limit} bytes (--max-request-bytes)"


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = DEFAULT_REQUEST_READ_TIMEOUT_S) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _declared_length(scope) > self.max_bytes:
            await error_response(413, too_large_message(self.max_bytes))(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, self._guarded(receive), tracking_send)
        except BodyRefused as exc:
            if started:
                raise
            await error_response(exc.status_code, exc.detail, headers=exc.headers)(scope, receive, send)

    def _guarded(self, receive: Receive) -> Receive:
        received = 0
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        body_done = False

        async def guarded() -> Message:
            nonlocal received, body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:
                raise BodyTooSlow(self.timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        return guarded


def _declared_length(scope: Scope) -> int:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0  # the HTTP parser rejects a malformed length before we are called
    return 0
