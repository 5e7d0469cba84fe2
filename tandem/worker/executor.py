"""Executors run submitted steps on the device. The engine calls ``submit`` for step N+1, then
``collect`` for step N; a synchronous executor has finished each step when ``submit`` returns.

Here the host-side ones, for CPU devices: the synchronous baseline, and a worker thread that plays
the device so the asynchronous pipeline runs (and is tested) without a GPU.

A step with grammar-constrained rows (``shape.num_masked``) gets its mask after submission
(``provide_mask``). The thread runs its forward at once and waits for the mask (a per-step
``threading.Event``) only before sampling; the synchronous executor keeps sync order: it runs the
step when the mask comes, so the host has processed the previous step first."""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from tandem.contract.step import StepInputs, StepOutput, parse_output
from tandem.contract.worker import StepInterval
from tandem.worker.model_runner import ModelRunner
from tandem.worker.timing import StepTimes


class Executor(Protocol):
    def submit(self, step: StepInputs) -> Any: ...
    def mask_buffer(self, step_id: int, rows: int, words: int) -> np.ndarray | None: ...
    def provide_mask(self, step_id: int, mask: np.ndarray) -> None: ...
    def collect(self, handle: Any) -> StepOutput: ...
    def drain(self) -> None: ...
    times: StepTimes  # when the device ran each collected step

    def start_timing(self) -> None: ...
    def stop_timing(self) -> list[StepInterval]: ...
    def shutdown(self) -> None: ...


@dataclass
class _MaskWait:
    """The grammar mask of a submitted step, which the host provides later (None: drained without one)."""

    step_id: int
    ready: threading.Event = field(default_factory=threading.Event)
    mask: np.ndarray | None = None

    def give(self, mask: np.ndarray | None) -> None:
        self.mask = mask
        self.ready.set()


class _HostExecutor:
    """Runs a step where it is called, timing it on the host clock (the device lane)."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.times = StepTimes()

    def _run(self, step: StepInputs, wait: _MaskWait | None = None) -> StepOutput:
        start = time.perf_counter()
        data = torch.from_numpy(step.data).to(self.runner.device)
        if wait is None:
            out = self.runner.run(data, step.shape, step.sampler)
        else:  # the forward first; only the sampling stage waits for the mask
            forwarded = self.runner.forward(data, step.shape)
            wait.ready.wait()
            mask = None if wait.mask is None else torch.from_numpy(wait.mask).to(self.runner.device)
            out = self.runner.finish_forwarded(forwarded, step.shape, step.sampler, mask)
        out = out.cpu().numpy()
        self.times.add(StepInterval(step.step_id, start, time.perf_counter()))
        return parse_output(out, step.step_id, step.shape, step.sampler)

    def start_timing(self) -> None:
        self.times.start_capture()

    def mask_buffer(self, step_id: int, rows: int, words: int) -> np.ndarray | None:
        return None  # the host's own array: these executors read it where it is

    def stop_timing(self) -> list[StepInterval]:
        self.drain()
        return self.times.stop_capture()

    def drain(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


@dataclass
class _Held:
    """A synchronous step waiting for its grammar mask; it runs when the mask comes."""

    step: StepInputs
    output: StepOutput | None = None


class SyncExecutor(_HostExecutor):
    """Copy in, run, copy out: the host and the device take turns."""

    _held: _Held | None = None

    def submit(self, step: StepInputs) -> StepOutput | _Held:
        if step.shape.num_masked:
            self._held = _Held(step)
            return self._held
        return self._run(step)

    def provide_mask(self, step_id: int, mask: np.ndarray | None) -> None:
        held, self._held = self._held, None
        if held is None or held.step.step_id != step_id:
            raise RuntimeError(f"a grammar mask for step {step_id}, which is not waiting for one")
        wait = _MaskWait(step_id)
        wait.give(mask)
        held.output = self._run(held.step, wait)

    def collect(self, handle: StepOutput | _Held) -> StepOutput:
        if isinstance(handle, _Held):
            if handle.output is None:
                raise RuntimeError(f"step {handle.step.step_id} was collected before its grammar mask was provided")
            return handle.output
        return handle

    def drain(self) -> None:
        if self._held is not None:  # its tokens are dropped: run it unconstrained
            self.provide_mask(self._held.step.step_id, None)


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
        self._waits: dict[int, _MaskWait] = {}  # steps waiting for their grammar mask

    def submit(self, step: StepInputs) -> Future:
        wait = None
        if step.shape.num_masked:
            wait = self._waits[step.step_id] = _MaskWait(step.step_id)
        future = self._worker.submit(self._run, step, wait)
        future.step_id = step.step_id  # collect checks that its mask came
        return future

    def provide_mask(self, step_id: int, mask: np.ndarray) -> None:
        wait = self._waits.pop(step_id, None)
        if wait is None:
            raise RuntimeError(f"a grammar mask for step {step_id}, which is not waiting for one")
        wait.give(mask)

    def collect(self, handle: Future) -> StepOutput:
        if handle.step_id in self._waits:  # it would wait forever
            raise RuntimeError(f"step {handle.step_id} was collected before its grammar mask was provided")
        return handle.result()

    def drain(self) -> None:
        for wait in self._waits.values():  # their tokens are dropped: they run unconstrained
            wait.give(None)
        self._waits.clear()
        self._worker.submit(lambda: None).result()  # the worker runs in order: all earlier steps are done

    def shutdown(self) -> None:
        for wait in self._waits.values():
            wait.give(None)
        self._worker.shutdown(wait=True)
        torch.set_num_threads(self._host_threads)
