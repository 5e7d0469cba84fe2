"""The device lane of a benchmark on CUDA: events recorded on the compute stream around each step,
converted to the host's perf_counter clock through one anchor event."""
from __future__ import annotations

import time

import torch

from tandem.engine.worker_api import StepInterval


class CudaStepTimer:
    def __init__(self, stream: torch.cuda.Stream) -> None:
        self.stream = stream
        torch.cuda.synchronize(stream.device)
        self._anchor = torch.cuda.Event(enable_timing=True)
        self._anchor.record(stream)
        self._anchor.synchronize()
        self._anchor_host = time.perf_counter()
        self._events: dict[int, tuple[torch.cuda.Event, torch.cuda.Event]] = {}

    def mark(self) -> torch.cuda.Event:
        """Record an event on the compute stream now (call inside that stream's context)."""
        event = torch.cuda.Event(enable_timing=True)
        event.record(self.stream)
        return event

    def add(self, step_id: int, start: torch.cuda.Event, end: torch.cuda.Event) -> None:
        self._events[step_id] = (start, end)

    def intervals(self) -> list[StepInterval]:
        torch.cuda.synchronize(self.stream.device)
        at = lambda e: self._anchor_host + self._anchor.elapsed_time(e) / 1e3  # noqa: E731
        return [StepInterval(step_id, at(s), at(e)) for step_id, (s, e) in sorted(self._events.items())]
