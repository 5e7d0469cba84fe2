"""CUDA executor: H2D, compute and D2H on three non-default streams, ordered only by events.

Two buffers (pinned host + device inputs, device + pinned host outputs) alternate between steps.
Before a buffer is reused, the events of the step that last used it fence it:
  - host inputs of buffer k: rewritten only after their previous H2D copy is done (``h2d_done``);
  - device inputs of buffer k: overwritten only after the compute that read them is done (``compute_done``);
  - device outputs of buffer k: overwritten only after their previous D2H copy is done (``d2h_done``).
Asynchronous: the host plans step N+1 while the device runs step N. Synchronous (``blocking``): the
same work, with the host waiting for each step's output at the end of ``submit`` (the baseline).

A step with grammar-constrained rows (``shape.num_masked``) is enqueued in two parts. ``submit``
enqueues its H2D copy and forward (a graph replay where one fits: graphs hold no sampler). The host
then processes the previous step, fills the mask and calls ``provide_mask``, which copies the mask
on the H2D stream (``mask_done``; pinned and device mask buffers per buffer k, fenced like the
inputs) and enqueues the sampling stage behind a wait on that event, then the step's output copy. So
the forward overlaps the host's work and only sampling waits; the next ``submit`` comes after
``provide_mask``, so the compute stream keeps the steps' order. (A blocking executor waits for the
output at the end of ``provide_mask`` instead.)"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tandem.contract.step import SamplerFlags, StepInputs, StepOutput, StepShape, output_words, parse_output
from tandem.contract.worker import StepInterval
from tandem.worker.cuda_graphs import DecodeGraphs
from tandem.worker.model_runner import Forwarded, ModelRunner
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
    # grammar masks (made on first use): pinned int32 host rows, their device copy, and its event
    host_mask: torch.Tensor | None = None
    dev_mask: torch.Tensor | None = None
    mask_done: torch.cuda.Event = field(default_factory=torch.cuda.Event)


@dataclass
class _Handle:
    step_id: int
    buffer: int
    num_words: int  # of the packed output
    shape: StepShape
    flags: SamplerFlags


@dataclass
class _Awaiting:
    """A submitted step whose forward is enqueued and whose sampling waits for its grammar mask."""

    handle: _Handle
    step: StepInputs
    forwarded: Forwarded


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
        self._awaiting: _Awaiting | None = None

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
        if self._awaiting is not None:  # its sampling must come first on the compute stream
            raise RuntimeError(f"step {self._awaiting.handle.step_id} is still waiting for its grammar mask")
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
        handle = _Handle(step.step_id, k, n_out, step.shape, step.sampler)
        with torch.cuda.stream(self.compute):
            self.compute.wait_event(buf.h2d_done)
            self.compute.wait_event(buf.d2h_done)
            buf.started.record(self.compute)
            if step.shape.num_masked:  # sampling and the output copy come with the mask
                self._awaiting = _Awaiting(handle, step, self._forward(buf.dev_in[:n_words], step))
                return handle
            buf.dev_out[:n_out].copy_(self._run(buf.dev_in[:n_words], step))
        self._complete(buf, n_out)
        return handle

    def _complete(self, buf: _Buffer, n_out: int) -> None:
        """After the step's output is in ``dev_out`` on the compute stream: its events and the D2H copy."""
        with torch.cuda.stream(self.compute):
            buf.ended.record(self.compute)
            buf.compute_done.record(self.compute)
        with torch.cuda.stream(self.d2h):
            self.d2h.wait_event(buf.compute_done)
            buf.host_out[:n_out].copy_(buf.dev_out[:n_out], non_blocking=True)
            buf.d2h_done.record(self.d2h)
        if self.blocking:
            buf.d2h_done.synchronize()

    def provide_mask(self, step_id: int, mask: np.ndarray | None) -> None:
        """The awaiting step's mask (None: sample unconstrained, its tokens are dropped): copy it, then
        enqueue the step's sampling stage behind the copy."""
        waiting, self._awaiting = self._awaiting, None
        if waiting is None or waiting.handle.step_id != step_id:
            raise RuntimeError(f"a grammar mask for step {step_id}, which is not waiting for one")
        buf, step = self.buffers[waiting.handle.buffer], waiting.step
        dev_mask = None if mask is None else self._copy_mask(buf, mask)
        with torch.cuda.stream(self.compute):
            if dev_mask is not None:
                self.compute.wait_event(buf.mask_done)  # the only wait: right before the sampler
            out = self.runner.finish_forwarded(waiting.forwarded, step.shape, step.sampler, dev_mask)
            buf.dev_out[:waiting.handle.num_words].copy_(out)
        self._complete(buf, waiting.handle.num_words)

    def mask_buffer(self, step_id: int, rows: int, words: int) -> np.ndarray | None:
        """The awaiting step's pinned mask rows: the host fills them in place (no copy in ``provide_mask``)."""
        waiting = self._awaiting
        if waiting is None or waiting.handle.step_id != step_id:
            return None
        buf = self.buffers[waiting.handle.buffer]
        self._reserve_mask(buf, rows * words)
        return buf.host_mask[:rows * words].numpy().reshape(rows, words)

    def _reserve_mask(self, buf: _Buffer, n: int) -> None:
        if buf.host_mask is None or buf.host_mask.numel() < n:
            # the step that last used this buffer was collected: its mask copy and sampling are over
            size = max(n, 2 * (0 if buf.host_mask is None else buf.host_mask.numel()))
            buf.host_mask = _pinned(size, torch.int32)
            buf.dev_mask = torch.empty(size, dtype=torch.int32, device=self.device)
        assert buf.mask_done.query(), "pinned mask buffer reused while its copy is in flight"

    def _copy_mask(self, buf: _Buffer, mask: np.ndarray) -> torch.Tensor:
        """The mask into buffer k's pinned rows (unless it is in page-locked memory: the host filled
        them in place, ``mask_buffer``, or grammar workers filled shared rows the host registered,
        ``Worker.pin_host_memory``; the host writes those again only after this step is collected),
        then to the device on the H2D stream (``mask_done``)."""
        n = mask.size
        self._reserve_mask(buf, n)
        source = torch.from_numpy(mask.reshape(-1))
        if not source.is_pinned():  # (page-locked already: these rows, or grammar workers' shared ones)
            np.copyto(buf.host_mask[:n].numpy(), mask.reshape(-1))
            source = buf.host_mask[:n]
        with torch.cuda.stream(self.h2d):
            self.h2d.wait_event(buf.compute_done)  # the buffer's previous step has read its device mask
            buf.dev_mask[:n].copy_(source, non_blocking=True)
            buf.mask_done.record(self.h2d)
        return buf.dev_mask[:n].view(mask.shape)

    def _forward(self, data: torch.Tensor, step: StepInputs) -> Forwarded:
        # first: the inputs after a speculating step in flight, resolved on the device (before a
        # graph's inputs are staged: the graphs hold no such op)
        data = self.runner.resolve_lagged(data, step.shape)
        graph = self.graphs.lookup(step) if self.graphs is not None else None
        if graph is not None:
            return self.graphs.forward(graph, data, step)
        bucket = self.piecewise.lookup(step) if self.piecewise is not None else None
        if bucket is not None:
            return self.piecewise.forward(bucket, data, step)
        return self.runner.forward(data, step.shape, resolved=True)

    def _run(self, data: torch.Tensor, step: StepInputs) -> torch.Tensor:
        return self.runner.finish_forwarded(self._forward(data, step), step.shape, step.sampler)

    def collect(self, handle: _Handle) -> StepOutput:
        if self._awaiting is not None and self._awaiting.handle is handle:  # its output copy is not even enqueued
            raise RuntimeError(f"step {handle.step_id} was collected before its grammar mask was provided")
        buf = self.buffers[handle.buffer]
        buf.d2h_done.synchronize()  # the only per-step host wait
        self.times.add(self.clock.interval(handle.step_id, buf.started, buf.ended))
        # a copy: this pinned buffer is rewritten two steps from now
        return parse_output(buf.host_out[:handle.num_words].numpy().copy(), handle.step_id, handle.shape, handle.flags)

    def drain(self) -> None:
        if self._awaiting is not None:  # its tokens are dropped: it samples unconstrained
            self.provide_mask(self._awaiting.handle.step_id, None)
        torch.cuda.synchronize(self.device)

    def start_timing(self) -> None:
        self.times.start_capture()

    def stop_timing(self) -> list[StepInterval]:
        return self.times.stop_capture()

    def shutdown(self) -> None:
        self.drain()
