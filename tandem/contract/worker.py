"""The one interface between the engine (host) and the worker (device): submit a packed step,
collect a typed output. A single-device worker (``worker.worker.DeviceWorker``) and a group of
tensor-parallel ranks (``parallel.tp_worker.TPWorker``) implement it; ``tandem.runtime`` chooses
which, and hands it the start-up steps (``contract.startup``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from tandem.contract.step import StepInputs, StepOutput


@dataclass(frozen=True)
class WorkerInfo:
    """What the host needs to know about the device side, fixed once the worker has started."""

    device: str  # e.g. "cuda:0", "cpu"
    device_name: str  # e.g. "NVIDIA H100 80GB HBM3"
    dtype: str
    num_kv_blocks: int  # including the reserved block 0
    block_size: int
    max_model_len: int
    num_rows: int  # rows of the next-token table that sequences may hold
    padding_row: int  # the row padding rows sample into
    graph_batch_sizes: tuple[int, ...]  # decode steps of up to these many sequences replay a graph
    graph_max_blocks: int  # block-table width of graph-replayed decode steps
    graph_token_buckets: tuple[int, ...] = ()  # other steps of up to these many tokens replay piecewise graphs
    kv_cache_dtype: str = ""  # the KV cache's element type, e.g. "bfloat16", "float8_e4m3fn" ("": dtype's)


@dataclass(frozen=True)
class StepInterval:
    """When the device ran one step, on the host's perf_counter clock (seconds)."""

    step_id: int
    start: float
    end: float


class Worker(Protocol):
    info: WorkerInfo

    def submit(self, step: StepInputs) -> Any: ...
    def mask_buffer(self, step_id: int, rows: int, words: int) -> np.ndarray | None:
        """Where the host may fill the newest step's mask (int32 [rows, words]) so that
        ``provide_mask`` need not copy it: memory the device copies from (pinned), or None (the
        host allocates its own)."""
        ...

    def provide_mask(self, step_id: int, mask: np.ndarray) -> None:
        """The grammar bitmask of the newest submitted step (``step.shape.num_masked`` > 0): int32
        [num_masked, ceil(vocab / 32)], row i for the step's sampled row ``mask_sample[i]``; bit t of
        a row (word t // 32, bit t % 32) set where token t is allowed. Given after ``submit``, before
        the next ``submit`` and before ``collect``: the device may run the step's forward meanwhile,
        and only its sampling waits for the mask. The host never writes ``mask`` again (a new
        array per step), so the worker may read it until the step is collected."""
    def collect(self, handle: Any) -> StepOutput: ...
    def set_async(self, enabled: bool) -> None: ...
    def drain(self) -> None:
        """Wait until every submitted step has finished on the device (results may be dropped); a
        step still waiting for its grammar mask samples without one (its tokens are dropped)."""
    def start_timing(self) -> None:
        """Keep the interval of every step collected from now on (a benchmark's device lane)."""
    def stop_timing(self) -> list[StepInterval]: ...
    def idle_fraction(self) -> float | None:
        """Device idle time between the most recent steps while the engine had work, over that time
        plus the steps' own (always measured)."""
    def device_seconds(self) -> tuple[float, float]:
        """Since start: (busy, idle) seconds of the device, idle counting only gaps between steps
        while the engine had work (see ``pause_device_clock``)."""
    def pause_device_clock(self) -> None:
        """The engine has no work: the gap until its next step is not counted as idle."""
    def shutdown(self) -> None: ...
