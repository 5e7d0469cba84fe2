"""Run one benchmark: the same model and prompts through each executor mode, measured."""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import torch

from tandem.bench.metrics import Interval, ModeResult, summarise
from tandem.bench.roofline import Ceilings, FloorModel, measure_ceilings
from tandem.engine.step_log import StepLog
from tandem.llm import LLM
from tandem.sampling_params import SamplingParams


@dataclass
class Workload:
    num_requests: int = 32
    prompt_len: int = 256
    max_tokens: int = 1024
    seed: int = 0
    temperature: float = 0.0


def random_prompts(w: Workload, vocab_size: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(w.seed)
    return torch.randint(0, vocab_size, (w.num_requests, w.prompt_len), generator=gen).tolist()


def bench_params(w: Workload) -> SamplingParams:
    # EOS ignored and no detokenization: every request generates exactly its budget of tokens
    return SamplingParams(temperature=w.temperature, seed=w.seed if w.temperature > 0 else None,
                          max_tokens=w.max_tokens, ignore_eos=True, detokenize=False)


@dataclass
class ModeRun:
    result: ModeResult
    token_ids: list[list[int]]


def run_mode(llm: LLM, mode: str, prompts: list[list[int]], w: Workload, floor: FloorModel | None,
             ceilings: Ceilings | None, use_tqdm: bool) -> ModeRun:
    engine = llm.engine
    engine.set_async_batching(mode == "async")
    llm.generate(prompts[:4], SamplingParams(max_tokens=8, ignore_eos=True, detokenize=False), use_tqdm=False)
    engine.step_log = log = StepLog()
    timed = hasattr(engine.executor, "start_timing")
    preempted_before = engine.scheduler.num_preemptions
    if timed:
        engine.executor.start_timing()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, bench_params(w), use_tqdm=use_tqdm)
    wall = time.perf_counter() - t0
    intervals = [Interval(*e) for e in engine.executor.stop_timing()] if timed else []
    engine.step_log = None
    token_ids = [o.outputs[0].token_ids for o in outs]
    result = summarise(mode, wall, log.records, intervals, sum(len(p) for p in prompts),
                       sum(len(t) for t in token_ids), len(prompts),
                       engine.scheduler.num_preemptions - preempted_before, floor, ceilings)
    return ModeRun(result, token_ids)


def run_benchmark(model: str, modes: list[str], w: Workload, engine_kwargs: dict,
                  use_tqdm: bool = True) -> tuple[LLM, dict[str, ModeRun], Ceilings | None]:
    llm = LLM(model, **engine_kwargs)
    device = llm.engine.device
    ceilings = measure_ceilings(device) if device.type == "cuda" else None
    floor = FloorModel(llm.engine.model_config, llm.engine.config.dtype)
    prompts = random_prompts(w, llm.engine.model_config.vocab_size)
    runs = {}
    for mode in modes:
        runs[mode] = run_mode(llm, mode, prompts, w, floor, ceilings, use_tqdm)
        gc.collect()
    return llm, runs, ceilings
