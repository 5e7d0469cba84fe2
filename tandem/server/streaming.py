"""Noticing a client that went away, for streamed and plain responses alike.

uvicorn silently drops writes to a closed connection, so a handler would keep its request running
until it finished. Instead, each response waits for ``http.disconnect`` on the ASGI receive channel
(which only reports the disconnect once the request body has been read) next to the work, and
cancels the work when it comes; the work's ``finally`` then aborts the engine requests."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

log = logging.getLogger(__name__)
T = TypeVar("T")


async def wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _first_of(work: asyncio.Future, watch: asyncio.Future) -> None:
    """Wait for either; cancel the other (both, if we are cancelled ourselves)."""
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, watch):
            if not task.done():
                task.cancel()
        await asyncio.gather(work, watch, return_exceptions=True)


async def unless_disconnected(request: Request, work: Awaitable[T]) -> tuple[bool, T | None]:
    """(True, result) when ``work`` completes; (False, None) when the client went away first."""
    task = asyncio.ensure_future(work)
    await _first_of(task, asyncio.ensure_future(wait_for_disconnect(request.receive)))
    if task.cancelled():
        return False, None
    return True, task.result()


class SSEResponse(StreamingResponse):
    """Server-sent events from an async iterator of ready-made ``data: ...`` frames. ``on_close``
    runs however the response ends, even if the client left before the first event."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            pump = asyncio.ensure_future(self._pump(send))
            await _first_of(pump, asyncio.ensure_future(wait_for_disconnect(receive)))
        finally:
            self.on_close()
        if not pump.cancelled() and pump.exception() is not None:
            raise pump.exception()

    async def _pump(self, send: Send) -> None:
        events = self.body_iterator
        try:
            async for data in events:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await events.aclose()  # runs the generator's cleanup now
