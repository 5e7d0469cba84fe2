"""Run one benchmark: the same model and requests through each executor mode, measured."""
from __future__ import annotations

import gc
import time

import torch

from tandem.bench.measure import ModeRun, measure_mode
from tandem.bench.roofline import Ceilings, FloorModel, measure_ceilings
from tandem.bench.workload import BenchRequest, Workload, bench_params, make_requests
from tandem.llm import LLM
from tandem.model.quant.config import resolve_quantization
from tandem.model.quant.linear import LinearStorage
from tandem.model.quant.reader import linear_storage
from tandem.sampling_params import SamplingParams


def run_mode(llm: LLM, mode: str, requests: list[BenchRequest], w: Workload, floor: FloorModel | None,
             ceilings: Ceilings | None, progress: bool) -> ModeRun:
    engine = llm.engine
    engine.core.set_async(mode == "async")
    warm = [r.prompt for r in requests[:4]]
    room = engine.max_model_len - max(len(p) for p in warm)  # a few tokens, within the context
    llm.generate(warm, SamplingParams(max_tokens=min(8, room), ignore_eos=True, detokenize=False), use_tqdm=False)
    if w.structured_output:  # the grammar compiled and its worker processes started before the clock runs
        llm.generate(warm, bench_params(w, min(8, room)), use_tqdm=False)
        engine.core.grammars.wait_for_workers(every=True)
    return measure_mode(engine, mode, requests, w, floor, ceilings, progress)


def weight_storage(llm: LLM) -> tuple[str | None, LinearStorage | None]:
    """(the quantization the model loaded with, or None; how its projections are stored, None: dense
    in the model dtype), as the worker decided them on its device."""
    engine, info = llm.engine, llm.engine.worker.info
    qc = resolve_quantization(engine.model_config.hf, engine.config.quantization)
    return (None if qc is None else qc.describe(),
            linear_storage(qc, torch.device(info.device), getattr(torch, info.dtype)))


#: ``runs=None``: up to this many rounds, while the next one would end within ``AUTO_BUDGET_S``
AUTO_RUNS, AUTO_BUDGET_S = 5, 20.0


def run_benchmark(llm: LLM, modes: list[str], w: Workload, progress: bool = True, runs: int | None = 1,
                  ) -> tuple[dict[str, list[ModeRun]], Ceilings | None, list[BenchRequest]]:
    """Each mode ``runs`` times, the modes alternating within a round (a change of load on the
    machine reaches both); ``None``: as many rounds as are fast enough (``AUTO_RUNS``)."""
    info = llm.engine.worker.info
    ceilings = measure_ceilings(torch.device(info.device)) if info.device.startswith("cuda") else None
    floor = FloorModel(llm.engine.model_config, getattr(torch, info.dtype), llm.engine.config.tensor_parallel_size,
                       weight_storage(llm)[1], getattr(torch, info.kv_cache_dtype or info.dtype))
    requests = make_requests(w, llm.engine.model_config.vocab_size)
    results: dict[str, list[ModeRun]] = {mode: [] for mode in modes}
    start = time.perf_counter()
    for done in range(1, (runs or AUTO_RUNS) + 1):
        for mode in modes:
            results[mode].append(run_mode(llm, mode, requests, w, floor, ceilings, progress))
            gc.collect()
        if runs is None and (time.perf_counter() - start) / done * (done + 1) > AUTO_BUDGET_S:
            break
    return results, ceilings, requests
