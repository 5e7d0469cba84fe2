"""The persistent batch (``RunningState``) and the array-operation decode path against the per-sequence
code they replace in the steady state: the same plans, the same packed steps, the same tokens, and a
running state that always mirrors the sequences it holds."""
from __future__ import annotations

import random

import numpy as np
import pytest

from tandem.contract.step import Logprobs, Padding, StepOutput
from tandem.engine.batch import build_step
from tandem.engine.block_manager import BlockManager, RowPool
from tandem.engine.plan import SchedulerOutput
from tandem.engine.prefix_cache import PrefixCache
from tandem.engine.scheduler import Scheduler, StepDeltas
from tandem.engine.sequence import Sequence
from tandem.sampling_params import SamplingParams

EOS = 3
VOCAB = 40


def _params(rng: random.Random) -> SamplingParams:
    return rng.choice([
        SamplingParams(max_tokens=64),
        SamplingParams(max_tokens=64, temperature=0.7, seed=rng.randrange(100), logprobs=rng.randint(0, 3)),
        SamplingParams(max_tokens=64, ignore_eos=True, stop_token_ids=[5, 6]),
        SamplingParams(max_tokens=64, min_tokens=rng.randint(1, 4), logit_bias={7: 1.5}),
        SamplingParams(max_tokens=64, presence_penalty=0.5, repetition_penalty=1.2),
    ])


def _workload(seed: int, n: int) -> list[Sequence]:
    rng = random.Random(seed)
    return [Sequence(str(i), [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 30))], _params(rng), seed=i,
                     max_new_tokens=rng.randint(1, 24)) for i in range(n)]


def _scheduler(fast: bool, num_blocks: int, budget: int, caching: bool = False) -> Scheduler:
    s = Scheduler(6, budget, BlockManager(num_blocks, 4, PrefixCache() if caching else None), RowPool(12),
                  eos_token_ids=frozenset({EOS}), max_blocks_per_seq=32)
    s.decode_fast_path = fast
    return s


def _output(sched: SchedulerOutput, step: int) -> StepOutput:
    """Deterministic fake tokens (EOS now and then) and logprobs for every sampled entry."""
    ids = [e.seq.request_id for e in sched.items if e.sample]
    tokens = np.array([(int(rid) * 7 + step * 3) % VOCAB for rid in ids], np.int64)
    n, k = len(tokens), 3
    found = Logprobs(-np.arange(n, dtype=np.float32), np.arange(1, n + 1), np.arange(n * k).reshape(n, k) % VOCAB,
                     -np.ones((n, k), np.float32))
    return StepOutput(step, tokens, found)


def _entries(sched: SchedulerOutput, blocks: bool = False) -> list[tuple]:
    """The step's entries in step order; with ``blocks``, each sequence's block ids after planning."""
    return [(e.seq.request_id, e.start, e.num_tokens, e.sample, e.gen_index) + ((tuple(e.seq.block_ids),) if blocks else ())
            for e in sched.items]


def check_state(s: Scheduler) -> None:
    """Each running sequence's row in the running state mirrors the sequence."""
    st = s.state
    for seq in s.running:
        r = seq.row
        assert st.tokens[r] == seq.prompt_len + len(seq.output_token_ids) + seq.num_pending
        assert st.num_blocks[r] == len(seq.block_ids)
        assert st.block_table[r, :len(seq.block_ids)].tolist() == seq.block_ids
        known = seq.prompt_token_ids + seq.output_token_ids
        assert st.last_token[r] == known[-1] and st.request_ids[r] == seq.request_id
        assert st.tag[r] > 0 and seq._state is st
    for seq in s.waiting:
        assert seq._state is None


def _check_layouts_agree(sched: SchedulerOutput) -> None:
    """Whatever planned the step, laying its decode block out by gathers from the running state packs
    exactly what laying every entry out one by one packs (padded to a graph's shape or not)."""
    one_by_one = SchedulerOutput(sched.step_id, sched.items)
    for pad in (None, Padding(8, 8, 32, padding_row=12)):  # 32: the scheduler's max_blocks_per_seq
        if pad is not None and not all(e.num_tokens == 1 and e.sample for e in one_by_one.chunks):
            continue
        a, b = build_step(sched, 4, pad), build_step(one_by_one, 4, pad)
        assert a.shape == b.shape and a.sampler == b.sampler and np.array_equal(a.data, b.data)


def _run(fast: bool, seed: int, num_blocks: int, budget: int, caching: bool = False, lag: int = 1):
    """Run a workload to the end, ``lag`` steps in flight (1: asynchronous batching). Block ids are
    compared only without caching: the array path registers a block its output filled when the token
    comes back, the loop when it schedules the step, so the cache's eviction order may differ."""
    s = _scheduler(fast, num_blocks, budget, caching)
    seqs = _workload(seed, 14)
    for seq in seqs:
        s.add(seq)
    plans, in_flight = [], []
    for step in range(3000):
        sched = s.schedule()
        if len(sched):
            in_flight.append(sched)
            plans.append(_entries(sched, blocks=not caching))
            _check_layouts_agree(sched)
        while in_flight and (len(in_flight) > lag or not len(sched)):
            done = in_flight.pop(0)
            deltas = StepDeltas()
            s.update(done, _output(done, done.step_id), deltas)
            check_state(s)
        if not s.has_work() and not in_flight:
            break
    outputs = {q.request_id: (q.output_token_ids, q.finish_reason) for q in seqs}
    return plans, outputs, s


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("lag", [0, 1])
def test_the_decode_path_plans_what_the_per_sequence_loop_plans(seed, lag):
    """With blocks and budget to spare (so no policy choice differs), identical steps and outputs."""
    slow_plans, slow_out, _ = _run(False, seed, num_blocks=200, budget=512, lag=lag)
    fast_plans, fast_out, s = _run(True, seed, num_blocks=200, budget=512, lag=lag)
    assert fast_plans == slow_plans and fast_out == slow_out
    assert s.blocks.num_free == 199 and s.rows.num_free == s.rows.num_rows


@pytest.mark.parametrize("lag", [0, 1])
@pytest.mark.parametrize("num_blocks,budget,caching", [(12, 512, False), (18, 512, False), (24, 16, False),
                                                       (24, 16, True), (30, 64, True)])
def test_with_blocks_short_the_decode_path_still_plans_what_the_loop_plans(lag, num_blocks, budget, caching):
    """Blocks run out: sequences wait, and the newest are preempted, in the loop's order (the same
    blocks handed to the same sequences), while the rest of the decodes stay one array block."""
    preemptions = 0
    for seed in range(8):
        slow_plans, slow_out, _ = _run(False, seed, num_blocks, budget, caching, lag)
        fast_plans, fast_out, s = _run(True, seed, num_blocks, budget, caching, lag)
        assert fast_plans == slow_plans and fast_out == slow_out
        assert s.blocks.num_free == num_blocks - 1
        preemptions += s.num_preemptions
    assert preemptions > 0


def test_a_blocks_short_decode_step_keeps_its_decode_block():
    """Two of three decoding sequences need a new block and one is free: the first takes it, the
    second preempts the newest (whose blocks a launched step still reads, so it waits), and the
    first and the one whose token fits its last block decode as one array block."""
    s = _scheduler(True, num_blocks=7, budget=512)
    seqs = [Sequence(str(i), list(range(1, n + 1)), SamplingParams(max_tokens=16), seed=i, max_new_tokens=16)
            for i, n in enumerate([4, 6, 4])]  # block size 4: the 4-token prompts fill their blocks
    for seq in seqs:
        s.add(seq)
    first = s.schedule()  # 1 + 2 + 1 blocks: two free
    s.update(first, _output(first, 0), StepDeltas())
    s.blocks.allocate(1)  # someone else holds one: one left
    second = s.schedule()  # in flight: nothing it holds is freed before it completes
    assert second.decode is not None and [q.request_id for q in second.decode.seqs] == ["0", "1"]
    assert not second.chunks and s.num_preemptions == 1 and seqs[2] in s.waiting
    assert len(seqs[0].block_ids) == 2 and len(seqs[1].block_ids) == 2


@pytest.mark.parametrize("seed", range(6))
def test_under_memory_pressure_and_caching_the_state_stays_true(seed):
    """Tight blocks force the fallback (preemption) and small budgets chunk prefills; every step's
    state is checked against the sequences (``check_state``) and everything comes back."""
    _, out, s = _run(True, seed, num_blocks=24, budget=16, caching=True)
    assert all(reason is not None for _, reason in out.values())
    assert s.blocks.num_free == 23 and s.rows.num_free == s.rows.num_rows and not s.requests


def test_steady_decodes_take_the_array_path():
    s = _scheduler(True, 200, 512)
    for seq in _workload(1, 5):
        seq.max_new_tokens = 20
        s.add(seq)
    first = s.schedule()
    s.update(first, _output(first, 0), StepDeltas())
    second = s.schedule()
    assert second.decode is not None and len(second.decode) == 5 and not second.chunks


@pytest.mark.parametrize("pad", [None, Padding(8, 8, 10, padding_row=12), Padding(8, 8, 10, padding_row=11)])
def test_a_decode_block_packs_exactly_like_its_entries_one_by_one(pad):
    s = _scheduler(True, 200, 512)
    for seq in _workload(2, 6):
        seq.max_new_tokens = 20
        s.add(seq)
    for step in range(4):
        sched = s.schedule()
        if step >= 2:  # steady decodes, some tokens known, some pending
            assert sched.decode is not None
            one_by_one = SchedulerOutput(sched.step_id, sched.items)
            a, b = build_step(sched, 4, pad), build_step(one_by_one, 4, pad)
            assert a.shape == b.shape and a.sampler == b.sampler and np.array_equal(a.data, b.data)
        s.update(sched, _output(sched, step), StepDeltas())


def test_extending_a_row_past_the_tables_width_widens_it_and_keeps_every_row():
    from tandem.engine.running import RunningState

    rng = np.random.default_rng(7)
    st = RunningState(num_rows=3, max_blocks=4)
    first, other = rng.integers(1, 1000, 3).tolist(), rng.integers(1, 1000, 2).tolist()
    st.extend_blocks(0, first)
    st.extend_blocks(2, other)
    more = rng.integers(1, 1000, 5).tolist()  # 3 + 5 > 4 columns
    st.extend_blocks(0, more)
    assert st.block_table.shape[1] >= 8 and st.num_blocks.tolist()[0::2] == [8, 2]
    assert st.block_table[0, :8].tolist() == first + more and st.block_table[2, :2].tolist() == other
