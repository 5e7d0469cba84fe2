"""Noticing an engine core that is alive but stuck (a device that never finishes a step, a lost
message): while requests wait on it, a working core sends something at least every
``STATS_INTERVAL_S`` or after every step. Silence longer than the timeout ends in ``on_stuck``, which
declares the core dead: the requests fail, ``/health`` answers 503 and the server exits non-zero,
rather than hanging with a healthy face."""
from __future__ import annotations

import asyncio
from collections.abc import Callable


class CoreWatchdog:
    def __init__(self, timeout_s: float, silent_for: Callable[[], float], on_stuck: Callable[[float], None]) -> None:
        """``silent_for()``: seconds the core has kept requests waiting without a word (0 if none wait).
        A ``timeout_s`` of 0 turns the watchdog off."""
        self.timeout_s = timeout_s
        self.silent_for = silent_for
        self.on_stuck = on_stuck
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.timeout_s > 0:
            self._task = asyncio.ensure_future(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        tick = min(1.0, self.timeout_s / 4)
        while True:
            await asyncio.sleep(tick)
            silent = self.silent_for()
            if silent > self.timeout_s:
                self.on_stuck(silent)
                return
