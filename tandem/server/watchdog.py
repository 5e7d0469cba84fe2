"""Judging the engine core's health from the API process, by the stamps the core writes into shared
memory (``tandem.server.liveness``), never by when this process last got round to reading from it.

Two silences, two meanings:

- **No heartbeat** for ``heartbeat_timeout_s`` (``--core-heartbeat-timeout``, default 5 s): the core
  process is not running at all (SIGSTOP, a frozen cgroup). ``/health`` answers 503 at once, so a
  load balancer stops sending work, but nothing is killed: requests in flight (and new ones) wait,
  and a core that runs again (SIGCONT) carries on and ``/health`` turns 200 again.
- **No progress** for ``core_timeout_s`` (``--core-timeout``, default 600 s) while requests wait: the
  step loop has not turned in that long, whether the process is stopped or a step never ends (a hung
  device, heartbeat alive). ``on_stuck`` then kills the core and takes the dead-core path: requests
  fail with 503, ``/health`` answers 503 and the server exits 1. A core with nothing to wait for is
  never killed.

Both ages are taken from the stamps at the moment of judging. A blocked event loop (a long request
handler) delays the judging, not the core's writing: after any stall the stamps show that the core
kept working meanwhile, so a healthy core is never declared dead for the API process's own lag."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from tandem.server.liveness import CoreStamps

log = logging.getLogger(__name__)

MAX_TICK_S = 0.25  # how often the watchdog looks, at most: the /health route reads the stamps itself


class CoreWatchdog:
    def __init__(self, stamps: CoreStamps, core_timeout_s: float, heartbeat_timeout_s: float,
                 waiting_since: Callable[[], float | None], on_stuck: Callable[[float], None]) -> None:
        """``waiting_since()``: since when requests have waited on the core without a break (None when
        none wait). ``on_stuck(seconds)``: called once, with the seconds without progress. A timeout
        of 0 turns its check off."""
        self.stamps = stamps
        self.core_timeout_s = core_timeout_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.waiting_since = waiting_since
        self.on_stuck = on_stuck
        self.started = time.monotonic()  # the core is judged only from here on (it was ready then)
        self._task: asyncio.Task | None = None

    def heartbeat_age(self) -> float:
        return time.monotonic() - max(self.stamps.heartbeat, self.started)

    def responsive(self) -> bool:
        """False while the core process has not run for ``heartbeat_timeout_s``."""
        return self.heartbeat_timeout_s <= 0 or self.heartbeat_age() <= self.heartbeat_timeout_s

    def silent_for(self) -> float:
        """Seconds requests have waited with no turn of the core's step loop (0 when none wait)."""
        since = self.waiting_since()
        if since is None:
            return 0.0
        return time.monotonic() - max(self.stamps.progress, since)

    def start(self) -> None:
        if self.core_timeout_s > 0 or self.heartbeat_timeout_s > 0:
            self._task = asyncio.ensure_future(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        tick = min([MAX_TICK_S] + [t / 4 for t in (self.core_timeout_s, self.heartbeat_timeout_s) if t > 0])
        was_responsive = True
        while True:
            await asyncio.sleep(tick)
            responsive = self.responsive()
            if responsive != was_responsive:
                self._log_change(responsive)
                was_responsive = responsive
            silent = self.silent_for()
            if self.core_timeout_s > 0 and silent > self.core_timeout_s:
                self.on_stuck(silent)
                return

    def _log_change(self, responsive: bool) -> None:
        if responsive:
            log.warning("the engine core runs again: /health answers 200")
        else:
            log.error("the engine core process has not run for %.1f s (stopped?): /health answers 503; "
                      "requests wait (up to --core-timeout)", self.heartbeat_age())
