"""Limits on a request before it reaches the app: the size of its request line and headers, and the
time a client takes to send them. uvicorn's httptools protocol has neither (a 20 MB header was
answered 200; a connection that sends nothing, or a header a byte at a time, stayed open for ever),
and its h11 protocol caps the size but parses in Python. So the httptools protocol is used with both
limits added: over the size, 431 and the connection closed; past the deadline, 408 and closed. The
body has its own deadline (``tandem.server.body_limit``); between requests, uvicorn's keep-alive
timeout closes idle connections.

The deadline runs from the connection's start, then again from the first byte of each further
request on it, until its headers are complete."""
from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from tandem.server.defaults import DEFAULT_MAX_HEADER_BYTES, DEFAULT_REQUEST_READ_TIMEOUT_S
from tandem.server.errors import error_body


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    max_header_bytes = DEFAULT_MAX_HEADER_BYTES
    header_timeout_s = DEFAULT_REQUEST_READ_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_bytes = 0
        self._refused = False
        self._header_timer: asyncio.TimerHandle | None = None

    # --- the deadline ----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        self._start_timer()

    def on_headers_complete(self) -> None:
        self._stop_timer()
        if not self._refused:
            super().on_headers_complete()

    def _start_timer(self) -> None:
        self._stop_timer()
        self._header_timer = self.loop.call_later(
            self.header_timeout_s, self._refuse, 408,
            f"the request headers did not arrive within this server's limit of {self.header_timeout_s:g} s "
            "(--request-read-timeout)")

    def _stop_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    # --- the size ----------------------------------------------------------------------------------
    def on_url(self, url: bytes) -> None:
        if self._counted(len(url)):
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._counted(len(name) + len(value) + 4):  # ": " and CRLF
            super().on_header(name, value)

    def _counted(self, size: int) -> bool:
        """Counts ``size`` bytes of the request head; False once the request is refused."""
        self._header_bytes += size
        if self._header_bytes > self.max_header_bytes:
            self._refuse(431, f"the request line and headers are larger than this server's limit of "
                              f"{self.max_header_bytes} bytes (--max-header-bytes)")
        return not self._refused

    # --- a refused request: nothing of it reaches the app ---------------------------------------
    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refused:
            super().on_message_complete()

    def _refuse(self, status: int, message: str) -> None:
        if self._refused or self.transport.is_closing():
            return
        self._refused = True
        self._stop_timer()
        body = msgspec.json.encode(error_body(status, message))
        self.transport.write(b"".join([STATUS_LINE[status], b"content-type: application/json\r\n",
                                       b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n", body]))
        self.transport.close()


def limited_protocol(max_header_bytes: int, header_timeout_s: float) -> type[LimitedHttpToolsProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)``, with these limits."""
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,),
                {"max_header_bytes": max_header_bytes, "header_timeout_s": header_timeout_s})
