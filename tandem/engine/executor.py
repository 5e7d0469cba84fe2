"""Executors run scheduled steps on the device. The engine only calls ``submit`` then, possibly a
step later, ``collect``; how much runs ahead is the executor's business."""
from __future__ import annotations

from typing import Any, Protocol

import torch

from tandem.engine.batch import StepInputs
from tandem.engine.model_runner import ModelRunner


class Executor(Protocol):
    #: how many submitted steps may be outstanding before the engine collects the oldest
    depth: int

    def submit(self, step: StepInputs) -> Any: ...
    def collect(self, handle: Any) -> list[int]: ...
    def shutdown(self) -> None: ...


class SyncExecutor:
    """Copy in, run, copy out, wait: the host and the device take turns."""

    depth = 0

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.device = runner.device

    def submit(self, step: StepInputs) -> list[int]:
        ints = torch.from_numpy(step.ints).to(self.device)
        floats = torch.from_numpy(step.floats).to(self.device)
        return self.runner.run(ints, floats, step).tolist()

    def collect(self, handle: list[int]) -> list[int]:
        return handle

    def shutdown(self) -> None:
        pass
