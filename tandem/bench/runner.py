"""Run one benchmark: the same model and requests through each executor mode, measured."""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import torch

from tandem.bench.driver import drive
from tandem.bench.gc_watch import GcPauses
from tandem.bench.metrics import ModeResult, summarise
from tandem.bench.roofline import Ceilings, FloorModel, measure_ceilings
from tandem.bench.step_log import StepLog
from tandem.bench.workload import BenchRequest, Workload, make_requests
from tandem.llm import LLM
from tandem.model.quant.config import resolve_quantization
from tandem.model.quant.linear import LinearStorage
from tandem.model.quant.reader import linear_storage
from tandem.sampling_params import SamplingParams


@dataclass
class ModeRun:
    result: ModeResult
    token_ids: list[list[int]]


def run_mode(llm: LLM, mode: str, requests: list[BenchRequest], w: Workload, floor: FloorModel | None,
             ceilings: Ceilings | None, progress: bool) -> ModeRun:
    engine = llm.engine
    engine.core.set_async(mode == "async")
    warm = [r.prompt for r in requests[:4]]
    room = engine.max_model_len - max(len(p) for p in warm)  # a few tokens, within the context
    llm.generate(warm, SamplingParams(max_tokens=min(8, room), ignore_eos=True, detokenize=False), use_tqdm=False)
    engine.core.reset_prefix_cache()  # each mode starts cold: hits come from the workload alone
    cache_before = engine.core.stats()
    log = StepLog(floor.windows if floor is not None else ())
    engine.core.observers.append(log)
    preempted_before = engine.core.scheduler.num_preemptions
    engine.worker.start_timing()
    t0 = time.perf_counter()
    try:
        with GcPauses() as pauses:
            token_ids = drive(engine, w, requests, progress)
    finally:
        wall = time.perf_counter() - t0
        intervals = engine.worker.stop_timing()
        engine.core.observers.remove(log)
    result = summarise(mode, wall, log.records, intervals, sum(len(r.prompt) for r in requests),
                       sum(len(t) for t in token_ids), len(requests),
                       engine.core.scheduler.num_preemptions - preempted_before, floor, ceilings)
    result.gc_pauses = pauses.summary()
    if engine.core.prefix_caching:
        cache_after = engine.core.stats()
        result.set_prefix_cache(cache_after.prefix_cache_queries - cache_before.prefix_cache_queries,
                                cache_after.prefix_cache_hits - cache_before.prefix_cache_hits)
    return ModeRun(result, token_ids)


def weight_storage(llm: LLM) -> tuple[str | None, LinearStorage | None]:
    """(the quantization the model loaded with, or None; how its projections are stored, None: dense
    in the model dtype), as the worker decided them on its device."""
    engine, info = llm.engine, llm.engine.worker.info
    qc = resolve_quantization(engine.model_config.hf, engine.config.quantization)
    return (None if qc is None else qc.describe(),
            linear_storage(qc, torch.device(info.device), getattr(torch, info.dtype)))


def run_benchmark(llm: LLM, modes: list[str], w: Workload,
                  progress: bool = True) -> tuple[dict[str, ModeRun], Ceilings | None, list[BenchRequest]]:
    info = llm.engine.worker.info
    ceilings = measure_ceilings(torch.device(info.device)) if info.device.startswith("cuda") else None
    floor = FloorModel(llm.engine.model_config, getattr(torch, info.dtype), llm.engine.config.tensor_parallel_size,
                       weight_storage(llm)[1], getattr(torch, info.kv_cache_dtype or info.dtype))
    requests = make_requests(w, llm.engine.model_config.vocab_size)
    runs = {}
    for mode in modes:
        runs[mode] = run_mode(llm, mode, requests, w, floor, ceilings, progress)
        gc.collect()
    return runs, ceilings, requests
