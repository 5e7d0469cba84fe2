"""CUDA streams and events as no-ops on a CPU, so ``StreamExecutor``'s Python (its two-part
submission of a step with grammar masks, the mask copies, completion and drain) runs in CI without
a GPU. Everything runs in order on a CPU anyway; what this cannot show is the streams' concurrency,
which the GPU checks cover. Install it in a process of its own (it replaces ``torch.cuda`` names)."""
from __future__ import annotations

import contextlib

import torch


class Event:
    def __init__(self, enable_timing: bool = False) -> None:
        self.records = 0

    def record(self, stream=None) -> None:
        self.records += 1

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


class Stream:
    device = torch.device("cpu")

    def __init__(self, device=None) -> None:
        pass

    def wait_event(self, event: Event) -> None:
        pass

    def wait_stream(self, stream: Stream) -> None:
        pass


class Clock:
    def __init__(self, stream: Stream) -> None:
        pass

    def interval(self, step_id: int, start: Event, end: Event):
        from tandem.contract.worker import StepInterval

        return StepInterval(step_id, 0.0, 0.0)


def install() -> None:
    torch.cuda.Stream, torch.cuda.Event = Stream, Event
    torch.cuda.stream = lambda stream: contextlib.nullcontext()
    torch.cuda.current_stream = lambda device=None: Stream()
    torch.cuda.synchronize = lambda device=None: None
    import tandem.worker.stream_executor as se

    se._pinned = lambda n, dtype: torch.empty(n, dtype=dtype)
    se.CudaStepClock = Clock


def with_stream_executor(engine):
    """The engine's worker runs its steps through a ``StreamExecutor`` on the stubs."""
    from tandem.worker.stream_executor import StreamExecutor

    worker = engine.worker
    worker._executor = StreamExecutor(worker._executor.runner, blocking=not engine.config.async_batching,
                                      max_sampled=engine.config.max_num_seqs)
    return engine
