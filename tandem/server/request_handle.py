"""An API request's side of its engine requests: the queue its handler reads, and how it fails.

``EngineClient.submit`` makes a ``RequestHandle``; the client's receive tasks put each choice's
outputs (or a ``RequestFailed``) on its queue."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol

from tandem.outputs import RequestOutput


class Aborter(Protocol):
    def abort(self, engine_ids: list[str]) -> None: ...


class RequestFailed(Exception):
    """An accepted request cannot complete; ``status`` is the HTTP status to report it with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class RequestHandle:
    """An API request's view of its engine requests (one per choice)."""

    def __init__(self, client: Aborter, engine_ids: list[str]) -> None:
        self.client = client
        self.engine_ids = engine_ids
        self.queue: asyncio.Queue[tuple[int, RequestOutput] | RequestFailed] = asyncio.Queue()
        self.outputs: list[RequestOutput | None] = [None] * len(engine_ids)
        self.num_finished = 0
        self.closed = False

    async def updates(self) -> AsyncIterator[list[tuple[int, RequestOutput]]]:
        """The newest output of each choice that changed, coalesced over whatever arrived meanwhile
        (a slow reader gets fewer, larger updates); ends once every choice has finished."""
        while self.num_finished < len(self.engine_ids):
            items = [await self.queue.get()]
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            latest: dict[int, RequestOutput] = {}
            for item in items:
                if isinstance(item, RequestFailed):
                    raise item
                index, output = item
                latest[index] = output
                self.outputs[index] = output
                self.num_finished += output.finished
            yield sorted(latest.items())

    async def result(self) -> list[RequestOutput]:
        async for _ in self.updates():
            pass
        return list(self.outputs)  # type: ignore[arg-type]

    def close(self) -> None:
        """Abort whatever has not finished (the client went away, or the handler ended). Idempotent."""
        if not self.closed:
            self.closed = True
            self.client.abort(self.engine_ids)
