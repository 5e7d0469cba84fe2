"""When the device ran each step, always on: a rolling window gives the recent GPU idle fraction
(the server exports it), and a capture gives the benchmark its device lane.

On CUDA, events recorded on the compute stream around each step are read once the step is
collected (they are complete by then) and placed on the host's perf_counter clock through one
anchor event. On a CPU the worker's steps are timed with perf_counter directly."""
from __future__ import annotations

import time
from collections import deque

import torch

from tandem.contract.worker import StepInterval


class StepTimes:
    def __init__(self, window: int = 256) -> None:
        # each recent step with the device idle time before it (None: the engine had no work then)
        self._recent: deque[tuple[StepInterval, float | None]] = deque(maxlen=window)
        self._captured: list[StepInterval] | None = None
        # since start: device time in steps, and in gaps between steps while work was queued
        self.busy_s = 0.0
        self.idle_s = 0.0
        self._last_end: float | None = None  # None: the next gap is not counted (no work before it)

    def add(self, interval: StepInterval) -> None:
        if self._captured is not None:
            self._captured.append(interval)
        gap = None if self._last_end is None else max(0.0, interval.start - self._last_end)
        self._recent.append((interval, gap))
        self.busy_s += interval.end - interval.start
        self.idle_s += gap or 0.0
        self._last_end = interval.end

    def pause(self) -> None:
        """The engine ran out of work: the time until its next step is not the device's idling."""
        self._last_end = None

    def idle_fraction(self) -> float | None:
        """Idle time between the recent steps (gaps while the engine had work) over that time plus
        the steps' own (None if too few steps)."""
        if len(self._recent) < 2:
            return None
        recent = list(self._recent)[1:]  # the oldest step's gap lies outside the window
        gaps = sum(gap or 0.0 for _, gap in recent)
        busy = sum(i.end - i.start for i, _ in self._recent)
        return gaps / max(busy + gaps, 1e-12)

    def start_capture(self) -> None:
        self._captured = []

    def stop_capture(self) -> list[StepInterval]:
        captured, self._captured = self._captured or [], None
        return captured


class CudaStepClock:
    """Compute-stream events around each step, converted to host-clock intervals when collected."""

    def __init__(self, stream: torch.cuda.Stream) -> None:
        self.stream = stream
        torch.cuda.synchronize(stream.device)
        self._anchor = torch.cuda.Event(enable_timing=True)
        self._anchor.record(stream)
        self._anchor.synchronize()
        self._anchor_host = time.perf_counter()

    def interval(self, step_id: int, start: torch.cuda.Event, end: torch.cuda.Event) -> StepInterval:
        """For a completed step: its start and end on the host clock."""
        at = lambda e: self._anchor_host + self._anchor.elapsed_time(e) / 1e3  # noqa: E731
        return StepInterval(step_id, at(start), at(end))
