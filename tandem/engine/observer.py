"""Hooks into the step loop for whoever measures it (the benchmark): passed in, never probed for.

With no observer attached the loop pays one empty-list check per step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from tandem.engine.scheduler import SchedulerOutput


@dataclass(frozen=True)
class SubmitTimes:
    """Host clock (perf_counter seconds) around planning and launching one step."""

    begin: float
    scheduled: float
    built: float
    submitted: float


@dataclass(frozen=True)
class ProcessTimes:
    """Host clock around collecting and processing one step's output."""

    collect: float  # started waiting for the device
    collected: float  # the output arrived
    processed: float


class StepObserver(Protocol):
    def step_submitted(self, sched: SchedulerOutput, times: SubmitTimes) -> None: ...
    def step_processed(self, step_id: int, times: ProcessTimes) -> None: ...
