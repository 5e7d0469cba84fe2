"""CUDA executor: H2D, compute and D2H on three non-default streams, ordered only by events.

Two buffers (pinned host + device inputs, device + pinned host outputs) alternate between steps.
Before a buffer is reused, the events of the step that last used it fence it:
  - host inputs of buffer k: rewritten only after their previous H2D copy is done (``h2d_done``);
  - device inputs of buffer k: overwritten only after the compute that read them is done (``compute_done``);
  - device outputs of buffer k: overwritten only after their previous D2H copy is done (``d2h_done``).
Asynchronous: the host plans step N+1 while the device runs step N. Synchronous (``blocking``): the
same work, with the host waiting for each step's output at the end of ``submit`` (the baseline)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tandem.contract.step import SamplerFlags, StepInputs, StepOutput, StepShape, output_words, parse_output
from tandem.contract.worker import StepInterval
from tandem.worker.cuda_graphs import DecodeGraphs
from tandem.worker.model_runner import ModelRunner
from tandem.worker.piecewise_graphs import PiecewiseGraphs
from tandem.worker.timing import CudaStepClock, StepTimes

NUM_BUFFERS = 2


@dataclass
class _Buffer:
    host_in: torch.Tensor  # pinned int64: the packed step inputs
    dev_in: torch.Tensor
    dev_out: torch.Tensor
    host_out: torch.Tensor
    h2d_done: torch.cuda.Event
    compute_done: torch.cuda.Event
    d2h_done: torch.cuda.Event
    started: torch.cuda.Event  # timing events around the step on the compute stream, read at collect
    ended: torch.cuda.Event


@dataclass
class _Handle:
    step_id: int
    buffer: int
    num_words: int  # of the packed output
    shape: StepShape
    flags: SamplerFlags


def _pinned(n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(n, dtype=dtype, pin_memory=True)


class StreamExecutor:
    def __init__(self, runner: ModelRunner, blocking: bool, max_sampled: int, graphs: DecodeGraphs | None = None,
                 piecewise: PiecewiseGraphs | None = None) -> None:
        self.runner, self.blocking, self.graphs, self.piecewise = runner, blocking, graphs, piecewise
        self.device = runner.device
        self.h2d, self.compute, self.d2h = (torch.cuda.Stream(self.device) for _ in range(3))
        self.compute.wait_stream(torch.cuda.current_stream(self.device))  # weights and cache are ready
        self.buffers = [self._new_buffer(8192, max_sampled) for _ in range(NUM_BUFFERS)]
        self._next = 0
        self.clock = CudaStepClock(self.compute)
        self.times = StepTimes()

    def _new_buffer(self, n_words: int, n_out: int) -> _Buffer:
        dev = self.device
        return _Buffer(_pinned(n_words, torch.int64), torch.empty(n_words, dtype=torch.int64, device=dev),
                       torch.empty(n_out, dtype=torch.int64, device=dev), _pinned(n_out, torch.int64),
                       torch.cuda.Event(), torch.cuda.Event(), torch.cuda.Event(),
                       torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))

    def _fit(self, k: int, n_words: int, n_out: int) -> _Buffer:
        """Grow buffer k if this step's inputs or outputs do not fit (rare: bigger steps, logprobs).
        The step that last used the buffer was collected, so its output copy is over; its inputs
        may still be read, hence the waits."""
        buf = self.buffers[k]
        if buf.host_in.numel() < n_words:
            buf.h2d_done.synchronize()
            buf.compute_done.synchronize()
            size = max(n_words, 2 * buf.host_in.numel())
            buf.host_in = _pinned(size, torch.int64)
            buf.dev_in = torch.empty(size, dtype=torch.int64, device=self.device)
        if buf.host_out.numel() < n_out:
            size = max(n_out, 2 * buf.host_out.numel())
            buf.dev_out = torch.empty(size, dtype=torch.int64, device=self.device)
            buf.host_out = _pinned(size, torch.int64)
        return buf

    def submit(self, step: StepInputs) -> _Handle:
        k = self._next
        self._next = (k + 1) % NUM_BUFFERS
        n_words, n_out = step.data.size, output_words(step.shape, step.sampler)
        buf = self._fit(k, n_words, n_out)
        # The step that last used this buffer (two back) has been collected, so its copy is over; the
        # only per-step host wait stays the one in collect().
        assert buf.h2d_done.query(), "host input buffer reused while its copy is in flight"
        np.copyto(buf.host_in[:n_words].numpy(), step.data)
        with torch.cuda.stream(self.h2d):
            self.h2d.wait_event(buf.compute_done)
            buf.dev_in[:n_words].copy_(buf.host_in[:n_words], non_blocking=True)  # the step's one H2D copy
            buf.h2d_done.record(self.h2d)
        with torch.cuda.stream(self.compute):
            self.compute.wait_event(buf.h2d_done)
            self.compute.wait_event(buf.d2h_done)
            buf.started.record(self.compute)
            buf.dev_out[:n_out].copy_(self._run(buf.dev_in[:n_words], step))
            buf.ended.record(self.compute)
            buf.compute_done.record(self.compute)
        with torch.cuda.stream(self.d2h):
            self.d2h.wait_event(buf.compute_done)
            buf.host_out[:n_out].copy_(buf.dev_out[:n_out], non_blocking=True)
            buf.d2h_done.record(self.d2h)
        if self.blocking:
            buf.d2h_done.synchronize()
        return _Handle(step.step_id, k, n_out, step.shape, step.sampler)

    def _run(self, data: torch.Tensor, step: StepInputs) -> torch.Tensor:
        graph = self.graphs.lookup(step) if self.graphs is not None else None
        if graph is not None:
            return self.graphs.run(graph, data, step)
        bucket = self.piecewise.lookup(step) if self.piecewise is not None else None
        if bucket is not None:
            return self.piecewise.run(bucket, data, step)
        return self.runner.run(data, step.shape, step.sampler)

    def collect(self, handle: _Handle) -> StepOutput:
        buf = self.buffers[handle.buffer]
        buf.d2h_done.synchronize()  # the only per-step host wait
        self.times.add(self.clock.interval(handle.step_id, buf.started, buf.ended))
        # a copy: this pinned buffer is rewritten two steps from now
        return parse_output(buf.host_out[:handle.num_words].numpy().copy(), handle.step_id, handle.shape, handle.flags)

    def drain(self) -> None:
        torch.cuda.synchronize(self.device)

    def start_timing(self) -> None:
        self.times.start_capture()

    def stop_timing(self) -> list[StepInterval]:
        return self.times.stop_capture()

    def shutdown(self) -> None:
        torch.cuda.synchronize(self.device)
