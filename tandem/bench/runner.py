"""Run one benchmark: the same model and prompts through each executor mode, measured."""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import torch

from tandem.bench.metrics import ModeResult, summarise
from tandem.bench.roofline import Ceilings, FloorModel, measure_ceilings
from tandem.bench.step_log import StepLog
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
    engine.core.set_async(mode == "async")
    llm.generate(prompts[:4], SamplingParams(max_tokens=8, ignore_eos=True, detokenize=False), use_tqdm=False)
    log = StepLog()
    engine.core.observers.append(log)
    preempted_before = engine.core.scheduler.num_preemptions
    engine.worker.start_timing()
    t0 = time.perf_counter()
    try:
        outs = llm.generate(prompts, bench_params(w), use_tqdm=use_tqdm)
    finally:
        wall = time.perf_counter() - t0
        intervals = engine.worker.stop_timing()
        engine.core.observers.remove(log)
    token_ids = [o.outputs[0].token_ids for o in outs]
    result = summarise(mode, wall, log.records, intervals, sum(len(p) for p in prompts),
                       sum(len(t) for t in token_ids), len(prompts),
                       engine.core.scheduler.num_preemptions - preempted_before, floor, ceilings)
    return ModeRun(result, token_ids)


def run_benchmark(llm: LLM, modes: list[str], w: Workload,
                  use_tqdm: bool = True) -> tuple[dict[str, ModeRun], Ceilings | None]:
    cuda = llm.engine.worker.info.device.startswith("cuda")
    ceilings = measure_ceilings(torch.device(llm.engine.worker.info.device)) if cuda else None
    floor = FloorModel(llm.engine.model_config, getattr(torch, llm.engine.worker.info.dtype))
    prompts = random_prompts(w, llm.engine.model_config.vocab_size)
    runs = {}
    for mode in modes:
        runs[mode] = run_mode(llm, mode, prompts, w, floor, ceilings, use_tqdm)
        gc.collect()
    return runs, ceilings
