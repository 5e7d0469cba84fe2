"""A cap on request body size (``--max-request-bytes``), answered with 413 in OpenAI's error shape.

Tokenizing a prompt runs on the event loop (about a second per megabyte of text here), so the cap is
also what bounds how long one hostile request can hold every other client up. A declared
``Content-Length`` over the cap is refused before a byte of the body is read; a chunked body is
counted as it arrives and refused as soon as it crosses the cap."""
from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tandem.server.errors import error_response


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` mid-body; FastAPI re-raises HTTPExceptions met while reading a body,
    and the app's handler answers it in the error shape."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large_message(limit))


def too_large_message(limit: int) -> str:
    return f"the request body is larger than this server's limit of {limit} bytes (--max-request-bytes)"


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

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
            await self.app(scope, self._counting(receive), tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await error_response(413, too_large_message(self.max_bytes))(scope, receive, send)

    def _counting(self, receive: Receive) -> Receive:
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        return counted


def _declared_length(scope: Scope) -> int:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0  # the HTTP parser rejects a malformed length before we are called
    return 0
