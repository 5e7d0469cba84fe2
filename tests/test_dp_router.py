"""The data-parallel routing policy alone (tandem/server/dp_router.py): least load, prefix affinity,
the overload margin, the bounded record; and what it buys over round-robin on a shared-prefix mix."""
from __future__ import annotations

import random
from collections import OrderedDict

import pytest

from tandem.server.dp_router import KV_WEIGHT, PrefixRouter, block_hashes


def test_block_hashes_cover_full_blocks_and_chain():
    a = block_hashes(list(range(40)), 16)
    assert len(a) == 2  # the last 8 tokens are no full block
    b = block_hashes(list(range(32)) + [99] * 8, 16)
    assert a == b
    c = block_hashes([1] + list(range(1, 40)), 16)  # one token of the first block differs
    assert c[0] != a[0] and c[1] != a[1]  # chained: every later block differs too


def test_least_loaded_core_by_requests_then_kv():
    router = PrefixRouter(3, 16)
    router.sent(0, 5)
    router.sent(1, 2)
    router.sent(2, 2)
    router.kv_usage(1, 0.5)  # core 1 holds as many requests, but its cache is fuller
    assert router.choose([1, 2, 3]).core == 2
    router.done(0, 5)
    assert router.choose([4, 5, 6]).core == 0
    with pytest.raises(ValueError):
        PrefixRouter(0, 16)


def test_prefix_goes_where_it_was_sent_unless_overloaded():
    router = PrefixRouter(2, 4, margin=3)
    prefix = list(range(100, 116))  # 4 blocks
    first = router.choose(prefix + [1, 2, 3, 4])
    assert first.matched_blocks == 0
    router.sent(first.core)
    again = router.choose(prefix + [7, 8, 9, 10])
    assert again.core == first.core and again.matched_blocks == 4  # 1 request more loaded: within the margin
    router.sent(first.core, 3)  # now 4 ahead of the other core: past the margin
    moved = router.choose(prefix + [11, 12, 13, 14])
    assert moved.core != first.core and moved.matched_blocks == 0
    # the prefix is now recorded on the other core: it follows the newest copy
    assert router.choose(prefix).core == moved.core


def test_kv_usage_counts_toward_the_margin():
    router = PrefixRouter(2, 4, margin=KV_WEIGHT / 2)
    prompt = list(range(8))
    holder = router.choose(prompt).core
    router.kv_usage(holder, 1.0)  # a full cache: KV_WEIGHT requests' worth of load
    assert router.choose(prompt).core != holder


def test_record_is_bounded_lru():
    router = PrefixRouter(2, 2, max_blocks=6)
    router.choose([1, 1, 2, 2, 3, 3])  # 3 blocks
    router.choose([9, 9, 8, 8, 7, 7])  # 3 more: at the bound
    router.choose([1, 1])  # touches the first prompt's first block
    router.choose([5, 5, 6, 6])  # 2 more: the 2 least recently used go
    assert len(router.record) == 6
    first = block_hashes([1, 1, 2, 2, 3, 3], 2)
    assert first[0] in router.record  # recently used: kept
    assert first[1] not in router.record and first[2] not in router.record
    assert block_hashes([9, 9], 2)[0] in router.record


def test_prefix_routing_beats_round_robin_on_shared_prefixes():
    """Requests of 32 groups, each group sharing a 64-token prefix, arrive in random order at 2 cores
    whose prefix caches hold 100 blocks each (an LRU, as the engine's): all 32 prefixes (128 blocks)
    fit in neither, half of them in each. The share of prefix blocks a request finds in its core's
    cache is high when the router keeps each group on one core, and about half with round-robin."""
    rng = random.Random(0)
    block, groups, capacity = 16, 32, 100
    prefixes = [[rng.randrange(1000) for _ in range(64)] for _ in range(groups)]
    prompts = [prefixes[rng.randrange(groups)] + [rng.randrange(1000) for _ in range(20)] for _ in range(600)]

    def hit_rate(pick) -> float:
        caches: list[OrderedDict[int, None]] = [OrderedDict(), OrderedDict()]
        hits = 0
        for i, prompt in enumerate(prompts):
            cache = caches[pick(i, prompt)]
            hashes = block_hashes(prompt, block)
            hits += sum(h in cache for h in hashes[:4])
            for h in hashes:
                cache[h] = None
                cache.move_to_end(h)
            while len(cache) > capacity:
                cache.popitem(last=False)
        return hits / (4 * len(prompts))

    router = PrefixRouter(2, block)
    loads = [0, 0]

    def routed(i: int, prompt: list[int]) -> int:
        core = router.choose(prompt).core
        router.sent(core)  # none finish: the load grows on both sides, the margin keeps them close
        loads[core] += 1
        return core

    prefix_rate = hit_rate(routed)
    round_robin_rate = hit_rate(lambda i, _: i % 2)
    assert prefix_rate > 0.8, prefix_rate
    assert round_robin_rate < 0.6, round_robin_rate
    assert min(loads) > 250  # both cores still take a fair share


def test_a_cores_reported_load_counts_where_others_send_too():
    router = PrefixRouter(2, 16)
    router.sent(0, 2)
    router.reported(1, 5)  # another API process's requests
    assert router.choose([1, 2, 3]).core == 0
    router.reported(1, 0)
    assert router.choose([4, 5, 6]).core == 1
