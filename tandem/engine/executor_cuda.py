"""CUDA executor: H2D, compute and D2H on three non-default streams, ordered only by events.

Two input slots (pinned host + device) and two output slots alternate between steps. Before a slot
is reused, the events of the step that last used it fence it:
  - host input slot k: rewritten only after its previous H2D copy is done (``h2d_done[k]``);
  - device input slot k: overwritten only after the compute that read it is done (``compute_done[k]``);
  - device output slot k: overwritten only after its previous D2H copy is done (``d2h_done[k]``).
With ``depth=1`` the host plans step N+1 while the device runs step N; with ``depth=0`` the same
work runs with the host waiting after every step (the synchronous baseline)."""
from __future__ import annotations

from dataclasses import dataclass

import time

import numpy as np
import torch

from tandem.engine.batch import Padding, StepInputs
from tandem.engine.cuda_graphs import DecodeGraphs
from tandem.engine.model_runner import ModelRunner
from tandem.engine.scheduler import SchedulerOutput

NUM_SLOTS = 2


@dataclass
class _Slot:
    host_in: torch.Tensor  # pinned int64: the packed step inputs
    dev_in: torch.Tensor
    dev_out: torch.Tensor
    host_out: torch.Tensor
    h2d_done: torch.cuda.Event
    compute_done: torch.cuda.Event
    d2h_done: torch.cuda.Event


def _pinned(n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(n, dtype=dtype, pin_memory=True)


@dataclass
class _Handle:
    slot: int
    num_sampled: int


class StreamExecutor:
    def __init__(self, runner: ModelRunner, depth: int, max_sampled: int, graphs: DecodeGraphs | None = None) -> None:
        self.runner, self.depth, self.graphs = runner, depth, graphs
        self.device = runner.device
        self.h2d, self.compute, self.d2h = (torch.cuda.Stream(self.device) for _ in range(3))
        self.compute.wait_stream(torch.cuda.current_stream(self.device))  # weights and cache are ready
        self.slots = [self._new_slot(8192, max_sampled) for _ in range(NUM_SLOTS)]
        self._next = 0
        self.timing = False
        self.events: dict[int, tuple[torch.cuda.Event, torch.cuda.Event]] = {}

    def _new_slot(self, n_words: int, n_out: int) -> _Slot:
        dev = self.device
        return _Slot(_pinned(n_words, torch.int64), torch.empty(n_words, dtype=torch.int64, device=dev),
                     torch.empty(n_out, dtype=torch.int64, device=dev), _pinned(n_out, torch.int64),
                     torch.cuda.Event(), torch.cuda.Event(), torch.cuda.Event())

    def _fit(self, k: int, n_words: int) -> _Slot:
        """Grow slot k's input buffers if this step's inputs do not fit (rare: bigger steps)."""
        slot = self.slots[k]
        if slot.host_in.numel() < n_words:
            slot.h2d_done.synchronize()  # the old buffers may still be copied from or read
            slot.compute_done.synchronize()
            grown = self._new_slot(max(n_words, 2 * slot.host_in.numel()), slot.dev_out.numel())
            grown.dev_out, grown.host_out = slot.dev_out, slot.host_out
            grown.compute_done, grown.d2h_done = slot.compute_done, slot.d2h_done
            self.slots[k] = slot = grown
        return slot

    def submit(self, step: StepInputs) -> _Handle:
        k = self._next
        self._next = (k + 1) % NUM_SLOTS
        n_words, n_out = step.data.size, step.shape.num_sampled
        slot = self._fit(k, n_words)
        # The step that last used this slot (two back) has been collected, so its copy is over; the
        # only per-step host wait stays the one in collect().
        assert slot.h2d_done.query(), "host input slot reused while its copy is in flight"
        np.copyto(slot.host_in[:n_words].numpy(), step.data)
        with torch.cuda.stream(self.h2d):
            self.h2d.wait_event(slot.compute_done)
            slot.dev_in[:n_words].copy_(slot.host_in[:n_words], non_blocking=True)  # the step's one H2D copy
            slot.h2d_done.record(self.h2d)
        with torch.cuda.stream(self.compute):
            self.compute.wait_event(slot.h2d_done)
            self.compute.wait_event(slot.d2h_done)
            start = self._mark()
            tokens = self._run(slot.dev_in[:n_words], step)
            slot.dev_out[:n_out].copy_(tokens)
            end = self._mark()
            slot.compute_done.record(self.compute)
        if start is not None:
            self.events[step.step_id] = (start, end)
        with torch.cuda.stream(self.d2h):
            self.d2h.wait_event(slot.compute_done)
            slot.host_out[:n_out].copy_(slot.dev_out[:n_out], non_blocking=True)
            slot.d2h_done.record(self.d2h)
        return _Handle(k, n_out)

    def _run(self, data: torch.Tensor, step: StepInputs) -> torch.Tensor:
        graph = self.graphs.lookup(step) if self.graphs is not None else None
        if graph is not None:
            return self.graphs.replay(graph, data)
        return self.runner.run(data, step)

    def padding_for(self, sched: SchedulerOutput) -> Padding | None:
        """Decode-shaped steps are padded to a captured graph's shape."""
        if self.graphs is None or not all(i.num_tokens == 1 and i.sample for i in sched.items):
            return None
        return self.graphs.padding_for(len(sched.items))

    def _mark(self) -> torch.cuda.Event | None:
        if not self.timing:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record(self.compute)
        return event

    def start_timing(self) -> None:
        """Record compute-stream events around every step from now on, aligned to the host clock."""
        torch.cuda.synchronize(self.device)
        self._anchor = torch.cuda.Event(enable_timing=True)
        self._anchor.record(self.compute)
        self._anchor.synchronize()
        self._anchor_host = time.perf_counter()
        self.events.clear()
        self.timing = True

    def stop_timing(self) -> list[tuple[int, float, float]]:
        """(step id, start, end) of each timed step on the host clock, in seconds."""
        torch.cuda.synchronize(self.device)
        self.timing = False
        at = lambda e: self._anchor_host + self._anchor.elapsed_time(e) / 1e3  # noqa: E731
        return [(step_id, at(s), at(e)) for step_id, (s, e) in sorted(self.events.items())]

    def collect(self, handle: _Handle) -> list[int]:
        slot = self.slots[handle.slot]
        slot.d2h_done.synchronize()  # the only per-step host wait
        return slot.host_out[:handle.num_sampled].tolist()

    def shutdown(self) -> None:
        torch.cuda.synchronize(self.device)
