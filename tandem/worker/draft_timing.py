"""The draft model's device time on the worker's step clock. Its forwards run between the engine's
steps (a speculating step is planned once the draft has proposed), so without this the benchmark and
the server's GPU idle fraction counted them as the device idling. Each ``propose`` call becomes one
interval with ``DRAFT_STEP_ID``, which the benchmark counts as busy device time but not as a step."""
from __future__ import annotations

import time
from typing import Callable

import torch

from tandem.contract.worker import StepInterval
from tandem.worker.timing import CudaStepClock, StepTimes

DRAFT_STEP_ID = -1  # an interval of draft work, not a step (step ids count from 0)


class TimedProposer:
    """A proposer whose calls are added to the current executor's step times (``executor()``: the
    worker switches executors between the sync and async loops): events on the current stream placed
    by the executor's clock on CUDA, perf_counter on a CPU, where the draft runs synchronously."""

    def __init__(self, proposer, executor: Callable[[], object]) -> None:
        self.proposer, self.executor = proposer, executor

    def propose(self, requests: list) -> list[list[int]]:
        executor = self.executor()
        times: StepTimes = executor.times
        clock: CudaStepClock | None = getattr(executor, "clock", None)
        if clock is None:
            t0 = time.perf_counter()
            out = self.proposer.propose(requests)
            times.add(StepInterval(DRAFT_STEP_ID, t0, time.perf_counter()))
            return out
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = self.proposer.propose(requests)  # waits for its drafts: the events are complete after end's
        end.record()
        end.synchronize()
        times.add(clock.interval(DRAFT_STEP_ID, start, end))
        return out

    def release(self, request_id: str) -> None:
        self.proposer.release(request_id)

    def __getattr__(self, name: str):  # the proposer's own state (tests, the graphs' count)
        return getattr(self.proposer, name)
