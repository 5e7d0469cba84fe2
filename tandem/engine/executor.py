"""Executors run scheduled steps on the device. The engine only calls ``submit`` then, possibly a
step later, ``collect``; how much runs ahead is the executor's business."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import torch

from tandem.engine.batch import Padding, StepInputs
from tandem.engine.model_runner import ModelRunner
from tandem.engine.scheduler import SchedulerOutput


class Executor(Protocol):
    #: how many submitted steps may be outstanding before the engine collects the oldest
    depth: int

    def padding_for(self, sched: SchedulerOutput) -> Padding | None: ...
    def submit(self, step: StepInputs) -> Any: ...
    def collect(self, handle: Any) -> list[int]: ...
    def shutdown(self) -> None: ...


def run_on_host_inputs(runner: ModelRunner, step: StepInputs) -> list[int]:
    return runner.run(torch.from_numpy(step.data).to(runner.device), step).tolist()


class _HostExecutor:
    def padding_for(self, sched: SchedulerOutput) -> Padding | None:
        return None  # no graphs on the host


class SyncExecutor(_HostExecutor):
    """Copy in, run, copy out, wait: the host and the device take turns."""

    depth = 0

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def submit(self, step: StepInputs) -> list[int]:
        return run_on_host_inputs(self.runner, step)

    def collect(self, handle: list[int]) -> list[int]:
        return handle

    def shutdown(self) -> None:
        pass


class ThreadExecutor(_HostExecutor):
    """The async pipeline without a GPU: one worker thread plays the device and runs steps in
    submission order, as a stream would; futures play the events. PyTorch releases the GIL inside
    its ops, so the host really does plan step N+1 while the worker computes step N."""

    depth = 1

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-device")

    def submit(self, step: StepInputs) -> Future:
        return self._worker.submit(run_on_host_inputs, self.runner, step)

    def collect(self, handle: Future) -> list[int]:
        return handle.result()

    def shutdown(self) -> None:
        self._worker.shutdown(wait=True)
