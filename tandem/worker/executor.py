"""Executors run submitted steps on the device. The engine calls ``submit`` for step N+1, then
``collect`` for step N; a synchronous executor has finished each step when ``submit`` returns.

Here the host-side ones, for CPU devices: the synchronous baseline, and a worker thread that plays
the device so the asynchronous pipeline runs (and is tested) without a GPU."""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import torch

from tandem.contract.step import StepInputs, StepOutput, parse_output
from tandem.contract.worker import StepInterval
from tandem.worker.model_runner import ModelRunner
from tandem.worker.timing import StepTimes


class Executor(Protocol):
    def submit(self, step: StepInputs) -> Any: ...
    def collect(self, handle: Any) -> StepOutput: ...
    def drain(self) -> None: ...
    times: StepTimes  # when the device ran each collected step

    def start_timing(self) -> None: ...
    def stop_timing(self) -> list[StepInterval]: ...
    def shutdown(self) -> None: ...


class _HostExecutor:
    """Runs a step where it is called, timing it on the host clock (the device lane)."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.times = StepTimes()

    def _run(self, step: StepInputs) -> StepOutput:
        start = time.perf_counter()
        data = torch.from_numpy(step.data).to(self.runner.device)
        out = self.runner.run(data, step.shape, step.sampler).cpu().numpy()
        self.times.add(StepInterval(step.step_id, start, time.perf_counter()))
        return parse_output(out, step.step_id, step.shape, step.sampler)

    def start_timing(self) -> None:
        self.times.start_capture()

    def stop_timing(self) -> list[StepInterval]:
        self.drain()
        return self.times.stop_capture()

    def drain(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


class SyncExecutor(_HostExecutor):
    """Copy in, run, copy out: the host and the device take turns."""

    def submit(self, step: StepInputs) -> StepOutput:
        return self._run(step)

    def collect(self, handle: StepOutput) -> StepOutput:
        return handle


class ThreadExecutor(_HostExecutor):
    """The async pipeline without a GPU: one worker thread plays the device and runs steps in
    submission order, as a stream would; futures play the events. PyTorch releases the GIL inside
    its ops, so the host really does plan step N+1 while the worker computes step N.

    The worker gets torch's intra-op threads; the host thread is set to one while this executor
    lives (its work is numpy and Python), because an idle OpenMP pool of the host's keeps spinning on
    the cores the worker needs (measured: 2x slower steps on 2 cores)."""

    def __init__(self, runner: ModelRunner, num_threads: int | None = None) -> None:
        super().__init__(runner)
        self._host_threads = torch.get_num_threads()
        threads = num_threads or self._host_threads
        torch.set_num_threads(1)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-device",
                                          initializer=torch.set_num_threads, initargs=(threads,))

    def submit(self, step: StepInputs) -> Future:
        return self._worker.submit(self._run, step)

    def collect(self, handle: Future) -> StepOutput:
        return handle.result()

    def drain(self) -> None:
        self._worker.submit(lambda: None).result()  # the worker runs in order: all earlier steps are done

    def shutdown(self) -> None:
        self._worker.shutdown(wait=True)
        torch.set_num_threads(self._host_threads)
