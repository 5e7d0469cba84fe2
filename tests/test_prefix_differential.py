"""Prefix caching on must give exactly the outputs of prefix caching off, on randomized workloads
with shared prefixes, repeated prompts, chunked prefill, aborts and preemption (tiny KV caches, so
cached blocks are also evicted), in sync and async mode."""
import os

import pytest

from differential import compare, make_case, run_case, run_case_with_stats, with_shared_prefixes

NUM_CASES = int(os.environ.get("TANDEM_PREFIX_DIFF_CASES", os.environ.get("TANDEM_DIFF_CASES", "64")))
CHUNKS = 8
BASE_SEED = int(os.environ.get("TANDEM_DIFF_SEED", "1000"))


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_prefix_caching_on_matches_off(chunk):
    hits = 0
    for seed in range(BASE_SEED + chunk, BASE_SEED + NUM_CASES, CHUNKS):
        case = with_shared_prefixes(make_case(seed))
        async_batching = bool(seed % 2)  # the reference is always sync with caching off
        off = run_case(case, async_batching=False, prefix_caching=False)
        on, stats = run_case_with_stats(case, async_batching=async_batching, prefix_caching=True)
        problems = compare(case, off, on, names=("off", "on"), aborts_may_differ=True)
        assert not problems, f"async={async_batching}\n" + case.describe() + "\n" + "\n".join(problems)
        hits += stats.prefix_cache_hits
    assert hits > 0  # the cases do exercise the cache
