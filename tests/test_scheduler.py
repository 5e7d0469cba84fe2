import random

import pytest

from tandem.contract.step import StepOutput
from tandem.engine.block_manager import BlockManager, RowPool
from tandem.engine.scheduler import Scheduler, StepDeltas
from tandem.engine.sequence import Sequence, SeqStatus
from tandem.sampling_params import SamplingParams


def _seq(i, prompt_len, max_new=8):
    return Sequence(str(i), list(range(1, prompt_len + 1)), SamplingParams(), seed=i, max_new_tokens=max_new)


def _sched(num_blocks=64, block_size=4, max_seqs=8, budget=32):
    return Scheduler(max_seqs, budget, BlockManager(num_blocks, block_size), RowPool(2 * max_seqs),
                     eos_token_ids=frozenset({3}))


def _complete(s, out, token=7):
    """Pretend the device ran the step and sampled ``token`` for every sampling item."""
    deltas = StepDeltas()
    s.update(out, StepOutput(out.step_id, [token] * sum(i.sample for i in out.items)), deltas)
    return deltas


def test_budget_chunks_prefill_and_decodes_go_first():
    s = _sched(budget=10)
    a, b = _seq(0, 6), _seq(1, 9)
    s.add(a), s.add(b)
    out = s.schedule()
    assert [(i.seq.request_id, i.start, i.num_tokens, i.sample) for i in out.items] == [("0", 0, 6, True),
                                                                                       ("1", 0, 4, False)]
    _complete(s, out)
    out = s.schedule()
    assert [(i.seq.request_id, i.start, i.num_tokens, i.sample) for i in out.items] == [("0", 6, 1, True),
                                                                                       ("1", 4, 5, True)]


def test_out_of_blocks_preempts_the_newest_and_recomputes_it():
    s = _sched(num_blocks=5, block_size=4, budget=64)  # 4 usable blocks = 16 tokens
    a, b = _seq(0, 7), _seq(1, 7)
    s.add(a), s.add(b)
    out = s.schedule()
    assert len(out.items) == 2
    _complete(s, out)
    for _ in range(2):
        out = s.schedule()
        _complete(s, out)
    # a needs a 3rd block for position 8; b (newest) gives its blocks back
    assert b.status is SeqStatus.WAITING and b.num_computed == 0 and b.num_preemptions == 1
    assert a.status is SeqStatus.RUNNING
    assert s.blocks.num_free + len(a.block_ids) == 4


def test_releases_wait_for_the_last_step_that_includes_the_sequence():
    s = _sched(num_blocks=16)
    a = _seq(0, 5)
    s.add(a)
    first = s.schedule()  # step 0 in flight
    second = s.schedule()  # step 1 planned optimistically: decode of the pending token
    assert second.items[0].num_tokens == 1 and a.num_pending == 2
    free_before = s.blocks.num_free
    deltas = _complete(s, first, token=3)  # EOS, found while processing step 0; step 1 still reads a's blocks
    assert deltas.finished == {"0": "stop"} and deltas.token_ids == [3] and a.finished
    assert s.blocks.num_free == free_before
    assert _complete(s, second).token_ids == []  # the speculative token of a finished sequence is dropped
    assert s.blocks.num_free == free_before + 2 and s.rows.num_free == s.rows.num_rows


def test_random_workload_never_leaks_or_double_books_blocks():
    rng = random.Random(0)
    s = _sched(num_blocks=20, block_size=4, max_seqs=6, budget=24)
    seqs = [_seq(i, rng.randint(1, 20), max_new=rng.randint(1, 12)) for i in range(30)]
    for seq in seqs:
        s.add(seq)
    for _ in range(2000):
        out = s.schedule()
        if not out.items:
            break
        owned = [b for q in s.running + list(s.waiting) for b in q.block_ids]
        assert len(owned) == len(set(owned)) and 0 not in owned
        if rng.random() < 0.05 and s.running:
            s.finish(rng.choice(s.running).request_id, "abort")
        _complete(s, out)
    assert all(q.finished and (q.finish_reason == "abort" or len(q.output_token_ids) == q.max_new_tokens)
               for q in seqs)
    assert s.blocks.num_free == 19 and s.rows.num_free == s.rows.num_rows and not s.requests


def test_duplicate_request_id_is_refused_and_changes_nothing():
    s = _sched()
    s.add(_seq(0, 3))
    with pytest.raises(ValueError, match="already in use"):
        s.add(_seq(0, 5))
    assert len(s.waiting) == 1 and s.waiting[0].prompt_len == 3
