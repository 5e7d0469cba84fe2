"""Prefix caching: the hash chain, reference counts, LRU eviction, and how the scheduler shares
cached blocks (at admission, in the same step, after preemption) and registers full blocks."""
import random
from collections import Counter, deque

import pytest

from tandem.contract.step import StepOutput
from tandem.engine.block_manager import BlockManager, RowPool
from tandem.engine.prefix_cache import PrefixCache, block_hash, extend_block_hashes
from tandem.engine.scheduler import Scheduler, StepDeltas
from tandem.engine.sequence import Sequence, SeqStatus
from tandem.sampling_params import SamplingParams

BS = 4


def _seq(rid, prompt, max_new=8, **params):
    return Sequence(str(rid), list(prompt), SamplingParams(**params), seed=0, max_new_tokens=max_new)


def _sched(num_blocks=64, max_seqs=8, budget=64):
    return Scheduler(max_seqs, budget, BlockManager(num_blocks, BS, PrefixCache()), RowPool(2 * max_seqs),
                     eos_token_ids=frozenset())


def _complete(s, out, token=7):
    s.update(out, StepOutput(out.step_id, [token] * sum(i.sample for i in out.items)), StepDeltas())


def _run_to_end(s, token=7):
    while s.has_work():
        _complete(s, s.schedule(), token)


def check_references(s: Scheduler) -> None:
    """Every block's count is the number of sequences and deferred releases holding it; a block is
    free, evictable or held, never two of these; block 0 is never anywhere."""
    holders = Counter(b for q in s.running + list(s.waiting) for b in q.block_ids)
    holders.update(b for entry in s._deferred for b in entry.block_ids)
    bm = s.blocks
    assert 0 not in holders and bm.ref_count(0) == 0
    for b in range(1, bm.num_blocks):
        assert bm.ref_count(b) == holders[b], b
        held, free, evictable = holders[b] > 0, b in bm._free, bm.cache.is_evictable(b)
        assert held + free + evictable == 1, (b, held, free, evictable)


# --- the hash chain -------------------------------------------------------------------------------
def test_block_hash_chains_parent_and_tokens():
    a = block_hash(None, [1, 2, 3, 4])
    assert a == block_hash(None, [1, 2, 3, 4]) and len(a) == 16  # stable: no per-process salt
    assert block_hash(a, [5, 6, 7, 8]) != block_hash(None, [5, 6, 7, 8])  # same tokens, other prefix
    assert block_hash(None, [1, 2, 3, 5]) != a
    assert block_hash(None, [2**40, 0]) != block_hash(None, [0, 2**40])


def test_sequence_hashes_cover_full_blocks_of_known_tokens_only():
    seq = _seq(0, range(10))
    assert extend_block_hashes(seq, BS, 99) == [block_hash(None, [0, 1, 2, 3]),
                                                block_hash(block_hash(None, [0, 1, 2, 3]), [4, 5, 6, 7])]
    seq.output_token_ids += [10, 11]  # block 2 = prompt [8, 9] + outputs [10, 11]
    seq.num_pending = 3  # pending tokens are not known: they never enter a hash
    hashes = extend_block_hashes(seq, BS, 99)
    assert len(hashes) == 3 and hashes[2] == block_hash(hashes[1], [8, 9, 10, 11])
    assert extend_block_hashes(seq, BS, 1) == hashes[:1] and seq.block_hashes == hashes  # kept on the sequence
    whole = _seq(1, list(range(10)) + [10, 11, 12])  # a later prompt = that prompt + its outputs
    assert extend_block_hashes(whole, BS, 99) == hashes


# --- block manager: references, sharing, LRU eviction ---------------------------------------------
def test_freed_cached_blocks_stay_findable_and_count_as_free():
    bm = BlockManager(6, BS, PrefixCache())
    a: list[int] = []
    bm.grow(a, 3 * BS)
    hashes = [block_hash(None, [i]) for i in range(3)]
    for block, h in zip(a[:2], hashes):
        bm.cache.register(block, h)
    bm.free(a)
    assert bm.num_free == 5 and bm.cache.lookup(hashes) == a[:2]
    b: list[int] = []
    assert bm.can_share_and_grow(a[:2], 5 * BS) and not bm.can_share_and_grow(a[:2], 6 * BS)
    bm.share(b, a[:2])
    assert b == a[:2] and bm.ref_count(a[0]) == 1 and bm.num_free == 3
    c: list[int] = []
    bm.share(c, a[:1])
    assert bm.ref_count(a[0]) == 2
    bm.free(b)
    assert bm.ref_count(a[0]) == 1 and bm.cache.is_evictable(a[1]) and not bm.cache.is_evictable(a[0])


def test_allocation_takes_free_blocks_first_then_evicts_least_recently_freed():
    bm = BlockManager(5, BS, PrefixCache())
    a: list[int] = []
    bm.grow(a, 2 * BS)
    b: list[int] = []
    bm.grow(b, 2 * BS)
    for i, block in enumerate(a + b):
        bm.cache.register(block, block_hash(None, [i]))
    bm.free(a)  # freed last block first: a[1] is older in the LRU than a[0]
    bm.free(b)
    assert bm._free == type(bm._free)() and bm.num_free == 4
    c: list[int] = []
    bm.grow(c, 3 * BS)
    assert c == [a[1], a[0], b[1]]  # the oldest first; each forgets its prefix
    assert bm.cache.lookup([block_hash(None, [0])]) == [] and bm.cache.num_cached == 1
    assert bm.cache.lookup([block_hash(None, [2])]) == [b[0]]


def test_block_zero_is_never_handed_out_and_nothing_leaks():
    bm = BlockManager(9, BS, PrefixCache())
    rng = random.Random(0)
    held: list[list[int]] = []
    for step in range(300):
        if held and (rng.random() < 0.5 or bm.num_free < 3):
            blocks = held.pop(rng.randrange(len(held)))
            bm.free(blocks)
        else:
            blocks: list[int] = []
            bm.grow(blocks, rng.randint(1, 3 * BS))
            assert 0 not in blocks
            bm.cache.register(blocks[0], block_hash(None, [step]))
            held.append(blocks)
    for blocks in held:
        bm.free(blocks)
    assert bm.num_free == 8 and all(bm.ref_count(b) == 0 for b in range(9))
    bm.reset_cache()
    assert sorted(bm._free) == list(range(1, 9)) and bm.cache.num_cached == 0


def test_a_second_block_with_the_same_content_stays_private():
    cache = PrefixCache()
    h = block_hash(None, [1, 2, 3, 4])
    cache.register(3, h)
    cache.register(5, h)
    assert cache.lookup([h]) == [3] and not cache.release(5) and cache.release(3)


# --- the scheduler ----------------------------------------------------------------------------------
def test_a_later_request_skips_the_cached_prefix():
    s = _sched()
    a = _seq(0, range(1, 15), max_new=2)
    s.add(a)
    _run_to_end(s)
    b = _seq(1, list(range(1, 11)) + [99, 98, 97])  # shares 2 full blocks (tokens 1..8) with a
    s.add(b)
    out = s.schedule()
    item = out.items[0]
    assert (item.start, item.num_tokens, item.num_cached) == (8, 5, 8)
    assert b.block_ids[:2] == s.cache.lookup(extend_block_hashes(a, BS, 2))
    assert s.prefix_cache_stats.queries == 14 + 13 and s.prefix_cache_stats.hits == 8
    check_references(s)


def test_the_last_token_is_always_computed_in_a_fresh_block():
    s = _sched()
    s.add(_seq(0, range(1, 13), max_new=1))  # 3 full blocks
    _run_to_end(s)
    s.add(_seq(1, range(1, 13)))  # the same prompt: 2 blocks shared, the 3rd recomputed for its logits
    item = s.schedule().items[0]
    assert (item.start, item.num_tokens, item.num_cached, item.sample) == (8, 4, 8, True)
    check_references(s)


def test_identical_prompts_share_blocks_within_one_step():
    s = _sched()
    a, b = _seq(0, range(1, 18)), _seq(1, range(1, 18))
    s.add(a), s.add(b)
    out = s.schedule()
    assert [(i.start, i.num_tokens, i.num_cached) for i in out.items] == [(0, 17, 0), (16, 1, 16)]
    assert a.block_ids[:4] == b.block_ids[:4] and a.block_ids[4] != b.block_ids[4]
    assert all(s.blocks.ref_count(x) == 2 for x in a.block_ids[:4])
    check_references(s)


def test_chunked_prefill_registers_each_block_as_its_chunk_is_scheduled():
    s = _sched(budget=6)
    a = _seq(0, range(1, 20))
    s.add(a)
    s.schedule()  # positions 0..5: block 0 full
    assert s.cache.num_cached == 1
    s.schedule()  # 6..11: blocks 1, 2
    assert s.cache.num_cached == 3
    b = _seq(1, range(1, 20))
    s.add(b)
    item = s.schedule().items[-1]  # a's last chunk takes the whole budget ...
    assert item.seq is a
    item = s.schedule().items[-1]  # ... then b starts after a's 4 full blocks, all registered by now
    assert item.seq is b and item.num_cached == 16
    check_references(s)


@pytest.mark.parametrize("fast_path", [True, False])
def test_a_block_that_outputs_fill_is_registered_when_its_last_token_comes_back(fast_path):
    """Output blocks are registered as they fill (spread over the steps), not all when the sequence
    leaves, and a later request finds them while the first still runs."""
    s = _sched()
    s.decode_fast_path = fast_path
    a = _seq(0, range(1, 7), max_new=6)
    s.add(a)
    first = s.schedule()  # prompt 6 tokens; token 6 pending
    second = s.schedule()  # decode of the pending token (position 6), token 7 pending
    assert s.cache.num_cached == 1  # block 0, computed by the prefill
    _complete(s, first, token=50)
    _complete(s, second, token=51)  # position 7 is known, its K/V is not computed yet
    assert s.cache.num_cached == 1
    third = s.schedule()  # computes position 7: block 1 is full and known, a still runs
    _complete(s, third, token=52)
    assert s.cache.num_cached == 2 and a.status is SeqStatus.RUNNING
    b = _seq(1, list(range(1, 7)) + [50, 51, 52])
    s.add(b)
    out = s.schedule()
    assert next(i for i in out.items if i.seq is b).num_cached == 8
    _complete(s, out)
    _run_to_end(s)
    # a's block 2 never had its last K/V computed; b's 17 tokens computed through position 15 fill
    # its blocks 2 and 3
    assert s.cache.num_cached == 4
    check_references(s)


def test_a_preempted_sequence_finds_its_own_blocks_again():
    s = _sched(num_blocks=7, budget=64)  # 6 usable blocks = 24 tokens
    a, b = _seq(0, range(1, 9), max_new=6), _seq(1, range(100, 108), max_new=12)
    s.add(a), s.add(b)
    while not b.num_preemptions:  # a's 4th block (position 12) preempts b, which holds 3
        _complete(s, s.schedule())
        check_references(s)
    # b's 3 full blocks went to the LRU tail first, and a took the tail (the least useful alone)
    assert b.status is SeqStatus.WAITING and len(s.cache.lookup(extend_block_hashes(b, BS, 3))) == 2
    while b.status is SeqStatus.WAITING:
        out = s.schedule()
        _complete(s, out)
    item = next(i for i in out.items if i.seq is b)
    assert (item.start, item.num_cached) == (8, 8) and s.prefix_cache_stats.hits == 8
    _run_to_end(s)
    check_references(s)
    assert s.blocks.num_free == 6


def test_requests_wanting_prompt_logprobs_take_no_cached_blocks_but_register_theirs():
    s = _sched()
    s.add(_seq(0, range(1, 14), max_new=1))
    _run_to_end(s)
    seq = _seq(1, range(1, 14), max_new=1)
    seq.params.prompt_logprobs = 0  # the field another change adds to SamplingParams
    s.add(seq)
    item = s.schedule().items[0]
    assert (item.start, item.num_cached) == (0, 0) and s.prefix_cache_stats.queries == 13
    check_references(s)


@pytest.mark.parametrize("num_blocks", [8, 12, 40])
def test_random_shared_prefix_workload_keeps_references_exact(num_blocks):
    rng = random.Random(num_blocks)
    s = _sched(num_blocks=num_blocks, max_seqs=5, budget=12)
    prefixes = [[rng.randrange(50) for _ in range(rng.randint(2, 12))] for _ in range(3)]
    seqs = []
    for i in range(40):
        prompt = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randint(1, 10))]
        seqs.append(_seq(i, prompt[:(num_blocks - 2) * BS], max_new=rng.randint(1, 8)))
    pending, in_flight = list(seqs), deque()
    while pending or s.has_work() or in_flight:
        if pending and rng.random() < 0.3:
            s.add(pending.pop(0))
        out = s.schedule()
        if out.items:
            in_flight.append(out)
        if rng.random() < 0.05 and s.running:
            s.finish(rng.choice(s.running).request_id, "abort")
        check_references(s)
        if in_flight and (len(in_flight) > 1 or not out.items):  # as the engine: one step in flight
            _complete(s, in_flight.popleft(), token=rng.randrange(50))
    assert s.prefix_cache_stats.hits > 0
    check_references(s)
    assert s.blocks.num_free == num_blocks - 1 and s.rows.num_free == s.rows.num_rows
