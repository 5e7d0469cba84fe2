"""Async batching must give exactly the outputs of sync batching, on randomized workloads."""
import os

import pytest

from differential import compare, make_case, run_case, with_constraints

NUM_CASES = int(os.environ.get("TANDEM_DIFF_CASES", "200"))
CHUNKS = 10
BASE_SEED = int(os.environ.get("TANDEM_DIFF_SEED", "1000"))


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_async_matches_sync(chunk):
    seeds = range(BASE_SEED + chunk, BASE_SEED + NUM_CASES, CHUNKS)
    for seed in seeds:
        case = make_case(seed)
        problems = compare(case, run_case(case, async_batching=False), run_case(case, async_batching=True))
        assert not problems, case.describe() + "\n" + "\n".join(problems)


@pytest.mark.parametrize("chunk", range(2))
def test_async_matches_sync_with_every_request_constrained(chunk):
    """Every request has structured output (the cases' grammar masks in every step), with the cases'
    preemption, aborts, n > 1 samples, penalties, logprobs and stop conditions."""
    for seed in range(BASE_SEED + 7000 + chunk, BASE_SEED + 7000 + max(2, NUM_CASES // 20), 2):
        case = with_constraints(make_case(seed), share=1.0)
        problems = compare(case, run_case(case, async_batching=False), run_case(case, async_batching=True))
        assert not problems, case.describe() + "\n" + "\n".join(problems)
