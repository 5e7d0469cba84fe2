"""A rank's executors: the single-device ones, plus one broadcast of the step's packed inputs from
rank 0 where the device takes the step.

On CUDA that is the compute stream, right after rank 0's H2D copy has landed (the stream already
waits for it): an NCCL broadcast of the device buffer, ordered by the same events as the step, so no
host waits for it. On a CPU it is the thread that plays the device, over gloo. Every rank then runs
the same path (graph replay, piecewise graphs or eager) on identical inputs; the followers' own copy
of the inputs is only a buffer for the broadcast to fill."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from tandem.contract.step import SamplerFlags, StepInputs, StepShape
from tandem.worker.cuda_graphs import DecodeGraphs
from tandem.worker.executor import Executor, SyncExecutor, ThreadExecutor
from tandem.worker.model_runner import Forwarded, ModelRunner
from tandem.worker.piecewise_graphs import PiecewiseGraphs
from tandem.worker.stream_executor import StreamExecutor


def receive_step(data: torch.Tensor) -> None:
    """Rank 0's inputs into ``data`` on every rank (in place; rank 0 sends)."""
    dist.broadcast(data, src=0)


class _ReceivingRunner:
    """A model runner that first receives the step (for the CPU executors, which call ``run``)."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.device = runner.device

    def run(self, data: torch.Tensor, shape: StepShape, flags: SamplerFlags) -> torch.Tensor:
        receive_step(data)
        return self.runner.run(data, shape, flags)

    def forward(self, data: torch.Tensor, shape: StepShape) -> Any:
        """A step with a grammar mask: its forward now, its sampling once the mask is here."""
        receive_step(data)
        return self.runner.forward(data, shape)

    def finish_forwarded(self, *args: Any) -> torch.Tensor:
        return self.runner.finish_forwarded(*args)


class TPStreamExecutor(StreamExecutor):
    def _forward(self, data: torch.Tensor, step: StepInputs) -> Forwarded:
        """Every step's forward starts here: ``_run`` for a whole step, ``submit`` alone for one whose
        sampling waits for its grammar mask (``provide_mask``: it needs no inputs of its own)."""
        receive_step(data)  # on the compute stream, after this buffer's H2D copy
        return super()._forward(data, step)


def make_rank_executor(runner: ModelRunner, async_batching: bool, max_sampled: int,
                       graphs: DecodeGraphs | None, piecewise: PiecewiseGraphs | None) -> Executor:
    if runner.device.type == "cuda":
        return TPStreamExecutor(runner, not async_batching, max_sampled, graphs, piecewise)
    receiving = _ReceivingRunner(runner)
    return ThreadExecutor(receiving) if async_batching else SyncExecutor(receiving)
