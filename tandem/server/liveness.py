"""The engine core's signs of life: two ``time.monotonic()`` stamps in shared memory that the core
process writes and the API process reads, with no message and no turn of its event loop in between.

- ``heartbeat``: written every ``HEARTBEAT_INTERVAL_S`` by a daemon thread of the core. It goes stale
  only when the whole process stops running: SIGSTOP, a frozen cgroup, a process the kernel does not
  schedule, or a C call that holds the GIL that long.
- ``progress``: written by the core's step loop at each turn: after every step, and at least every
  ``IDLE_POLL_MS`` while it waits for requests. It goes stale while one step runs, so a step that
  never ends (a hung device) leaves the heartbeat fresh and the progress stale.

Messages cannot serve as either: an idle core sends nothing, a busy one nothing during a step, and
what it sent is seen only when the API process's receive task runs, which a blocked event loop
delays. The stamps are read where they are judged, so time the API process spent blocked is never
counted against the core.

``CLOCK_MONOTONIC`` is system-wide on Linux (and does not advance in suspend), so the core's stamps
compare with the API process's clock. Each stamp has one writer and an aligned 8-byte store is not
torn on the platforms we run on: no lock."""
from __future__ import annotations

import threading
import time
from multiprocessing.context import BaseContext

HEARTBEAT_INTERVAL_S = 0.25
_HEARTBEAT, _PROGRESS = 0, 1


class CoreStamps:
    """Made by the API process before it spawns the core, and handed to the core as an argument
    (shared memory travels only that way)."""

    def __init__(self, ctx: BaseContext) -> None:
        self._stamps = ctx.RawArray("d", 2)  # 0.0 until the core first writes

    # --- the core's side ---------------------------------------------------------------------
    def start_heartbeat(self, interval_s: float = HEARTBEAT_INTERVAL_S) -> threading.Thread:
        def beat() -> None:
            while True:
                self._stamps[_HEARTBEAT] = time.monotonic()
                time.sleep(interval_s)

        thread = threading.Thread(target=beat, name="tandem-core-heartbeat", daemon=True)
        thread.start()
        return thread

    def progressed(self) -> None:
        self._stamps[_PROGRESS] = time.monotonic()

    # --- the API process's side --------------------------------------------------------------
    @property
    def heartbeat(self) -> float:
        return self._stamps[_HEARTBEAT]

    @property
    def progress(self) -> float:
        return self._stamps[_PROGRESS]
