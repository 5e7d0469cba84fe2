"""One measured pass of a workload through an engine in one executor mode: its step log, device
lane, preemptions, prefix-cache hits and tokens. The real device (``runner``) and the simulated
one (``simulated``) both measure through here."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from tandem.bench.driver import drive
from tandem.bench.gc_watch import GcPauses
from tandem.bench.metrics import ModeResult, summarise
from tandem.bench.roofline import Ceilings, FloorModel
from tandem.bench.step_log import StepLog
from tandem.bench.workload import BenchRequest, Workload
from tandem.engine.llm_engine import LLMEngine


@dataclass
class ModeRun:
    result: ModeResult
    token_ids: list[list[int]]


def measure_mode(engine: LLMEngine, mode: str, requests: list[BenchRequest], w: Workload, floor: FloorModel | None,
                 ceilings: Ceilings | None, progress: bool, clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep) -> ModeRun:
    """Run the workload once in ``mode`` ("sync" or "async"), the prefix cache cold, and measure it
    (wall time and arrivals on ``clock``, ``sleep``: a simulated device's, or the real ones)."""
    engine.core.set_async(mode == "async")
    engine.core.reset_prefix_cache()  # each run starts cold: hits come from the workload alone
    cache_before = engine.core.stats()
    log = StepLog(floor.windows if floor is not None else ())
    engine.core.observers.append(log)
    preempted_before = engine.core.scheduler.num_preemptions
    engine.worker.start_timing()
    t0 = clock()
    try:
        with GcPauses() as pauses, engine.core.heap.held():
            token_ids = drive(engine, w, requests, progress, clock, sleep)
    finally:
        wall = clock() - t0
        intervals = engine.worker.stop_timing()
        engine.core.observers.remove(log)
    engine.core.heap.idle()  # its clean-up, if due, after the clock
    result = summarise(mode, wall, log.records, intervals, sum(len(r.prompt) for r in requests),
                       sum(len(t) for t in token_ids), len(requests),
                       engine.core.scheduler.num_preemptions - preempted_before, floor, ceilings)
    result.gc_pauses = pauses.summary()
    if engine.core.prefix_caching:
        cache_after = engine.core.stats()
        result.set_prefix_cache(cache_after.prefix_cache_queries - cache_before.prefix_cache_queries,
                                cache_after.prefix_cache_hits - cache_before.prefix_cache_hits)
    if engine.core.speculation is not None:
        after = engine.core.stats()
        result.set_speculation(*(getattr(after, f) - getattr(cache_before, f) for f in
                                 ("spec_num_drafts", "spec_num_draft_tokens", "spec_num_accepted_tokens")))
    return ModeRun(result, token_ids)
