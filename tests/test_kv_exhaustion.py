"""KV exhaustion and preemption storms: a workload needing about fifteen times the KV cache (all at
once, and arriving steadily) completes with exactly the tokens of a run with a cache that never runs
short, greedy and seeded, sync and async; and no request starves: none is overtaken by more than
``max_num_seqs`` later ones, and none finishes later than it would on a server that served one
request at a time in arrival order."""
from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from reliability_utils import record
from tandem.config import EngineConfig
from tandem.llm import create_engine
from tandem.sampling_params import SamplingParams

NUM_REQUESTS, MAX_NUM_SEQS, BATCH_TOKENS = 24, 8, 64
SMALL_KV, LARGE_KV = 128, 16384


@dataclass
class Run:
    tokens: dict[int, list[int]]
    arrival: dict[int, int]  # step at which each request was added
    finish: dict[int, int]  # step whose outputs reported it finished
    preemptions: int


def _workload() -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(5)
    return [([rng.randrange(3, 500) for _ in range(rng.randint(10, 60))],
             SamplingParams(max_tokens=rng.randint(30, 60), ignore_eos=True, temperature=0.0 if i % 2 else 0.9,
                            seed=i)) for i in range(NUM_REQUESTS)]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a loaded 2-core machine: OpenMP's 2 threads only contend
    yield
    torch.set_num_threads(threads)


def _run(kv_tokens: int, arrive_every: int, async_batching: bool = True) -> Run:
    engine = create_engine(EngineConfig(model="random:tiny", device="cpu", kv_cache_tokens=kv_tokens, block_size=8,
                                        max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=BATCH_TOKENS,
                                        async_batching=async_batching))
    requests = _workload()
    run = Run({}, {}, {}, 0)
    step = 0
    while len(run.arrival) < len(requests) or engine.has_unfinished_requests():
        while len(run.arrival) < len(requests) and len(run.arrival) * arrive_every <= step:
            i = len(run.arrival)
            engine.add_request(str(i), None, requests[i][1], prompt_token_ids=requests[i][0])
            run.arrival[i] = step
        for out in engine.step():
            if out.finished:
                run.finish[int(out.request_id)] = step
                run.tokens[int(out.request_id)] = out.outputs[0].token_ids
        step += 1
        assert step < 20_000, "no progress"
    run.preemptions = engine.core.scheduler.num_preemptions
    engine.shutdown()
    return run


def _one_at_a_time_finish(run: Run) -> list[int]:
    """Finish steps of a server that ran one request at a time in arrival order: prefill chunks, then
    one step per token (plus one: outputs are reported a step late in async mode)."""
    finish, free_at = [], 0
    for i, (prompt, params) in enumerate(_workload()):
        service = -(-len(prompt) // BATCH_TOKENS) + params.max_tokens + 1
        free_at = max(run.arrival[i], free_at) + service
        finish.append(free_at)
    return finish


@pytest.mark.parametrize("arrive_every, async_batching", [(0, True), (0, False), (4, True)],
                         ids=["burst-async", "burst-sync", "steady-async"])
def test_a_workload_many_times_the_kv_cache_matches_a_large_cache_and_nobody_starves(arrive_every, async_batching):
    needed = sum(len(p) + sp.max_tokens for p, sp in _workload())
    assert needed > 10 * SMALL_KV
    large = _run(LARGE_KV, arrive_every, async_batching)
    small = _run(SMALL_KV, arrive_every, async_batching)
    assert small.tokens == large.tokens and len(small.tokens) == NUM_REQUESTS
    assert small.preemptions > NUM_REQUESTS // 2 and large.preemptions == 0  # a storm, and its control
    overtaken = [sum(small.finish[j] < small.finish[i] for j in range(i + 1, NUM_REQUESTS))
                 for i in range(NUM_REQUESTS)]
    assert max(overtaken) <= MAX_NUM_SEQS, overtaken
    bound = _one_at_a_time_finish(small)
    assert all(small.finish[i] <= bound[i] for i in range(NUM_REQUESTS)), (small.finish, bound)
    waits = [small.finish[i] - small.arrival[i] for i in range(NUM_REQUESTS)]
    record("kv_exhaustion", mode=f"arrive_every={arrive_every} async={async_batching}", requests=NUM_REQUESTS,
           kv_tokens=SMALL_KV, tokens_needed=needed, preemptions=small.preemptions, identical=True,
           max_overtaken=max(overtaken), max_wait_steps=max(waits), one_at_a_time_bound=bound[-1])
