"""Drive the engine through a workload: add each request at its arrival time, step until all end."""
from __future__ import annotations

import time
from typing import Callable

from tqdm.auto import tqdm

from tandem.bench.workload import BenchRequest, Workload, bench_params
from tandem.engine.llm_engine import LLMEngine


def drive(engine: LLMEngine, w: Workload, requests: list[BenchRequest], progress: bool,
          clock: Callable[[], float] = time.perf_counter,
          sleep: Callable[[float], None] = time.sleep) -> list[list[int]]:
    """Token ids generated for each request, in request order. ``clock`` and ``sleep``: the time
    arrivals follow (a simulated device's virtual clock, or the real one)."""
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)
    results: dict[str, list[int]] = {}
    bar = tqdm(total=sum(r.max_tokens for r in requests), desc="bench", unit="tok", disable=not progress)
    counted, start, next_i = engine.num_generated_tokens, clock(), 0
    while next_i < len(order) or engine.has_unfinished_requests():
        now = clock() - start
        while next_i < len(order) and requests[order[next_i]].arrival_s <= now:
            i = order[next_i]
            engine.add_request(f"bench-{i}", None, bench_params(w, requests[i].max_tokens),
                               prompt_token_ids=requests[i].prompt)
            next_i += 1
        if not engine.has_unfinished_requests():
            sleep(max(0.0, requests[order[next_i]].arrival_s - now))  # idle until the next arrival
            continue
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
        bar.update(engine.num_generated_tokens - counted)
        counted = engine.num_generated_tokens
    bar.close()
    return [results[f"bench-{i}"] for i in range(len(requests))]
