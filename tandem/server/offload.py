"""A bounded pool of worker threads for the API process's heavy per-request work: tokenizing prompts,
rendering chat templates, building the engine requests of many choices, and ``/tokenize`` and
``/detokenize``. On the event loop, a 4 MB prompt held every other client up for about 4 s.

Threads suffice because the tokenizer calls used here release the GIL while they run
(``tandem.server.tokenizing``); Python work on a thread (a chat template, a fan-out) yields the GIL
to the loop every few milliseconds. Work smaller than ``inline_size`` stays on the loop, where it
costs less than the hop to a thread. Larger work waits for a thread; when the work already taken
(running or queued, measured in characters and token ids) would exceed ``max_pending_size``, a new
large request gets 429 instead of a place in the queue, so a flood of large inputs cannot hold
memory and threads without bound."""
from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from tandem.server.errors import APIError

T = TypeVar("T")

#: below this many characters (or token ids), work runs on the loop: about a millisecond of tokenizing
INLINE_SIZE = 4096
#: work taken at once: 8 bodies at the default --max-request-bytes
MAX_PENDING_SIZE = 32 * 1024 * 1024


def default_threads() -> int:
    """Two at least (one large input does not stop the next), and no more than half the cores."""
    return max(2, min(4, (os.cpu_count() or 2) // 2))


class Offload:
    def __init__(self, threads: int | None = None, inline_size: int = INLINE_SIZE,
                 max_pending_size: int = MAX_PENDING_SIZE) -> None:
        self.threads = threads or default_threads()
        self.inline_size = inline_size
        self.max_pending_size = max_pending_size
        self.pending = 0  # size of the work taken and not yet done
        self._lock = threading.Lock()  # pending is released from the worker threads
        self._executor: ThreadPoolExecutor | None = None

    async def run(self, fn: Callable[..., T], *args: Any, size: int) -> T:
        """``fn(*args)``: on the loop if ``size`` is small, else on a worker thread (429 if too much
        work is taken already). Its exceptions propagate either way."""
        if size <= self.inline_size:
            return fn(*args)
        self._take(size)
        try:
            future = self._pool().submit(fn, *args)
        except BaseException:
            self._release(size)
            raise
        # released when the thread is done, not when the caller stops waiting: the bound is on real work
        future.add_done_callback(lambda _: self._release(size))
        return await asyncio.wrap_future(future)

    def _take(self, size: int) -> None:
        with self._lock:
            if self.pending and self.pending + size > self.max_pending_size:
                raise APIError(429, "the server is busy preparing other large requests; retry later",
                               code="too_many_requests")
            self.pending += size

    def _release(self, size: int) -> None:
        with self._lock:
            self.pending -= size

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="tandem-offload")
        return self._executor

    def close(self) -> None:
        """Drop queued work; work already running finishes on its thread."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

