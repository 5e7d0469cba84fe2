"""Async batching must give exactly the outputs of sync batching, on randomized workloads."""
import os

import pytest

from differential import compare, make_case, run_case

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
