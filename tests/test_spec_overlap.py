"""Speculative decoding overlapped with the host (docs/pipeline.md, "Speculative decoding"): with the
n-gram proposer the async loop plans a speculating step while the previous step runs, and the next
step on top of it, without draining the device; the device resolves the lagged sequences' inputs
from what the speculating step accepted. The resolved step is the step the host would build knowing
the outcome, and the outputs are those of no speculation, sync or async."""
import copy
import random
from collections import Counter

import numpy as np
import pytest
import torch

from differential import compare, make_case, run_case_with_stats
from tandem.contract.step import StepOutput
from tandem.engine.batch import build_step
from tandem.engine.block_manager import BlockManager, RowPool
from tandem.engine.scheduler import Scheduler, StepDeltas
from tandem.engine.sequence import Sequence
from tandem.engine.spec_path import accepted_count
from tandem.llm import LLM
from tandem.sampling_params import SamplingParams
from tandem.worker import spec_lag
from tandem.worker.model_runner import StepTensors, unpack
from tandem.worker.spec_lag import SpecLag
from test_spec_decode import _repetitive, _with

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
PROMPTS = [[11, 12, 13, 14] * 6, [5, 6, 7, 5, 6, 7, 5, 6], [40, 41, 40, 41, 40]]
PARAMS = [SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True),
          SamplingParams(max_tokens=40, temperature=0.8, seed=3, ignore_eos=True, repetition_penalty=1.2),
          SamplingParams(max_tokens=33, temperature=0.0, ignore_eos=True, min_tokens=5, logprobs=2)]


@pytest.fixture
def shifted(monkeypatch):
    """Counts the lagged sequences the device shifted back by a nonzero rejected count."""
    seen = {"steps": 0, "rows": 0}
    real = SpecLag.resolve

    def spy(self, f, shape, block_size):
        seen["steps"] += 1
        seen["rows"] += int(((self.rejected[f.seq_rows] * f.spec_lag) > 0).sum())
        return real(self, f, shape, block_size)

    monkeypatch.setattr(spec_lag.SpecLag, "resolve", spy)
    return seen


@pytest.mark.parametrize("async_batching", [False, True])
def test_ngram_speculation_never_drains(async_batching, shifted):
    """Speculating steps are submitted with the previous step in flight and nothing is drained for
    them; steps on top of a speculating one resolve on the device, some shifted by rejected
    proposals; the tokens are those of no speculation. Sync and async make the same decisions."""
    # float64: the logprobs too are equal to the last bit (float32 rounds other batch shapes apart)
    off = LLM("random:tiny", kv_cache_tokens=512, dtype="float64").generate(PROMPTS, PARAMS, use_tqdm=False)
    llm = LLM("random:tiny", kv_cache_tokens=512, dtype="float64", speculative_config=NGRAM,
              async_batching=async_batching)
    on = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in on] == [o.outputs[0].token_ids for o in off]
    assert [str(o.outputs[0].logprobs) for o in on][2] == str(off[2].outputs[0].logprobs)
    core = llm.engine.core
    stats = core.stats()
    assert core.spec_drains == 0
    assert core.spec_overlapped > 0
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    assert shifted["steps"] > 0 and shifted["rows"] > 0


DRAFTS = ("random:tiny", "random:tiny-gemma2")  # the target itself, and a random draft of another family


@pytest.mark.parametrize("draft", DRAFTS)
@pytest.mark.parametrize("async_batching", [False, True])
def test_the_draft_model_never_drains(async_batching, draft, shifted):
    """The draft proposes on the device in the step that verifies its proposals: its speculating
    steps are submitted with the previous step in flight and nothing is drained; the tokens are those
    of no speculation (float64: the logprobs too), and the draft equal to the target has every
    proposal of its greedy requests accepted."""
    off = LLM("random:tiny", kv_cache_tokens=512, dtype="float64").generate(PROMPTS, PARAMS, use_tqdm=False)
    llm = LLM("random:tiny", kv_cache_tokens=512, dtype="float64", async_batching=async_batching,
              speculative_config={"method": "draft", "model": draft, "num_speculative_tokens": 3})
    on = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in on] == [o.outputs[0].token_ids for o in off]
    assert str(on[2].outputs[0].logprobs) == str(off[2].outputs[0].logprobs)
    core = llm.engine.core
    stats = core.stats()
    assert core.spec_drains == 0 and core.spec_overlapped > 0
    assert stats.spec_num_drafts > 0 and shifted["steps"] > 0
    if draft == "random:tiny":
        greedy = LLM("random:tiny", kv_cache_tokens=512, dtype="float64", async_batching=async_batching,
                     speculative_config={"method": "draft", "model": draft, "num_speculative_tokens": 3})
        greedy.generate(PROMPTS, SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True), use_tqdm=False)
        greedy_stats = greedy.engine.core.stats()
        assert 0 < greedy_stats.spec_num_accepted_tokens == greedy_stats.spec_num_draft_tokens
        assert greedy.engine.core.spec_drains == 0


# seeds whose cases, n-gram on, have preemption, prefix-cache hits, aborts, penalties, stops, seeded
# sampling and structured output among them (asserted in aggregate below)
SEEDS = (8, 11, 14, 21, 27, 33)


def _ngram(rng: random.Random) -> dict:
    high = rng.randint(1, 4)
    return {"method": "ngram", "num_speculative_tokens": rng.randint(1, 5), "prompt_lookup_max": high,
            "prompt_lookup_min": rng.randint(1, high), "disable_by_batch_size": rng.choice([4, 32])}


KINDS = ("aborted", "penalised", "seeded", "stop strings", "stop ids", "min_tokens", "structured")


def count_kinds(case, kinds: Counter) -> None:
    """Add the kinds of request a randomized case holds (``KINDS``)."""
    for r in case.requests:
        p = r.params
        kinds["aborted"] += r.abort_at is not None
        kinds["penalised"] += p.presence_penalty != 0 or p.frequency_penalty != 0 or p.repetition_penalty != 1
        kinds["seeded"] += p.temperature > 0
        kinds["stop strings"] += bool(p.stop)
        kinds["stop ids"] += bool(p.stop_token_ids)
        kinds["min_tokens"] += p.min_tokens > 0
        kinds["structured"] += p.host_masked


def on_equals_off(case, spec: dict, totals: Counter) -> None:
    """Run the case without speculation and with ``spec`` (sync, async): sync equals async, on equals
    off; add the async run's preemptions, prefix-cache hits, drafts, accepted and rejected proposals."""
    off, _ = run_case_with_stats(_with(case, None), async_batching=True)
    on_sync, stats = run_case_with_stats(_with(case, spec), async_batching=False)
    on_async, stats_async = run_case_with_stats(_with(case, spec), async_batching=True)
    assert not compare(case, on_sync, on_async), case.describe()
    assert stats.spec_num_drafts == stats_async.spec_num_drafts
    problems = compare(case, off, on_async, ("off", "on"), aborts_may_differ=True, logprob_atol=1e-9)
    assert not problems, case.describe() + "\n" + "\n".join(problems)
    totals["preemptions"] += stats_async.num_preemptions
    totals["hits"] += stats_async.prefix_cache_hits
    totals["drafts"] += stats_async.spec_num_drafts
    totals["accepted"] += stats_async.spec_num_accepted_tokens
    totals["rejected"] += stats_async.spec_num_draft_tokens - stats_async.spec_num_accepted_tokens


def test_randomized_cases_give_the_tokens_of_no_speculation(shifted):
    """Randomized cases (tiny KV caches, chunked prefill, prefix caching, aborts, stop strings and ids,
    min_tokens, penalties, logit bias, logprobs, structured output, n > 1; greedy and seeded), the
    n-gram proposer with random settings: on (sync, async) equals off; the overlapped path ran."""
    totals, kinds = Counter(), Counter()
    for seed in SEEDS:
        case = _repetitive(make_case(7000 + seed), seed)
        count_kinds(case, kinds)
        on_equals_off(case, _ngram(random.Random(seed)), totals)
    assert all(totals[t] for t in ("preemptions", "hits", "drafts", "rejected")), totals
    assert all(kinds[k] for k in KINDS), kinds
    assert shifted["rows"] > 0, shifted


def test_the_device_records_each_rows_accepted_run():
    """``record``: per table row, the first draw that differs from its proposal becomes the next
    input, and the rows after it count as rejected, as the host's ``accepted_count`` finds."""
    rng = np.random.default_rng(0)
    lag, next_tokens = SpecLag(12, torch.device("cpu")), torch.zeros(12, dtype=torch.int64)
    rows, tokens, drafts, expect = [], [], [], {}
    for row in rng.permutation(11)[:6].tolist():
        k = int(rng.integers(0, 5))
        proposals = rng.integers(0, 4, k).tolist()
        drawn = rng.integers(0, 4, k + 1)
        a = accepted_count(drawn, proposals)
        expect[row] = (int(drawn[a]), k - a)
        rows += [row] * (k + 1)
        tokens += drawn.tolist()
        drafts += proposals + [-1]
    lag.record(next_tokens, torch.tensor(tokens), torch.tensor(rows), torch.tensor(drafts))
    for row, (token, rejected) in expect.items():
        assert (int(next_tokens[row]), int(lag.rejected[row])) == (token, rejected)
    assert any(r for _, r in expect.values()) and any(not r for _, r in expect.values())


def _decoding(s, n):
    seqs = [Sequence(f"r{i}", [10 + i, 11, 12, 13, 14][:3 + i % 3], SamplingParams(), seed=i, max_new_tokens=40)
            for i in range(n)]
    for seq in seqs:
        s.add(seq)
    out = s.schedule()
    s.update(out, StepOutput(out.step_id, [20 + i for i in range(n)]), StepDeltas())
    return seqs


FIELDS = ("positions", "seq_lens", "gen_index", "query_start", "logits_indices", "sample_rows", "draft_token")

@pytest.mark.parametrize("seed", range(6))
def test_a_resolved_step_is_the_step_planned_knowing_the_outcome(seed):
    """Step N verifies proposals (no draw is EOS: the two plans keep the same sequences); step N+1 is
    planned before N is processed (lagged), and again, from a copy of the scheduler, after it (exact). On the device, the lagged step's inputs resolved from
    N's draws equal the exact step's: positions, KV slots, context lengths, output indices, and the
    input tokens once placeholders resolve. N+1 speculates for some sequences too."""
    rng = random.Random(seed)
    s = Scheduler(8, 256, BlockManager(96, 4), RowPool(16), eos_token_ids=frozenset({3}))
    seqs = _decoding(s, rng.randint(1, 5))
    first = {q.request_id: [rng.randrange(3) for _ in range(rng.randint(1, 4))] for q in seqs if rng.random() < 0.8}
    step_n = s.schedule(first)
    inputs_n = unpack(torch.from_numpy(build_step(step_n, 4).data), build_step(step_n, 4).shape)
    drawn = torch.tensor([rng.randrange(3) for _ in range(int(inputs_n.sample_rows.numel()))])
    exact, step_copy = copy.deepcopy((s, step_n))  # one copy: the step's sequences are the copy's
    exact.update(step_copy, StepOutput(step_n.step_id, drawn.numpy()), StepDeltas())
    second = {q.request_id: [rng.randrange(3) for _ in range(rng.randint(1, 3))] for q in seqs if rng.random() < 0.5}
    held = [len(q.block_ids) for q in seqs]  # the same in both copies: blocks taken up to step N
    lagged_step = build_step(s.schedule(second or None), 4)
    exact_step = build_step(exact.schedule(second or None), 4)
    assert lagged_step.shape.num_lagged == len([c for c in step_n.chunks if c.proposals]) > 0
    # the device: step N's sampling stage, then step N+1's first op
    lag, next_tokens = SpecLag(17, torch.device("cpu")), torch.zeros(17, dtype=torch.int64)
    lag.record(next_tokens, drawn, inputs_n.sample_rows, inputs_n.draft_token)
    data = torch.from_numpy(lagged_step.data).clone()
    lag.resolve(StepTensors(data, lagged_step.shape), lagged_step.shape, 4)
    got, want = unpack(data, lagged_step.shape), unpack(torch.from_numpy(exact_step.data), exact_step.shape)
    for name in FIELDS:
        assert got[name].tolist() == want[name].tolist(), name
    ids = torch.where(got.input_ids < 0, next_tokens[(-got.input_ids - 1).clamp(min=0)], got.input_ids)
    assert ids.tolist() == want.input_ids.tolist()
    # KV slots: the sequence's own block at the real position; the lagged plan took blocks for its worst
    # case, so a block new in this step may differ from the exact plan's, the earlier ones may not
    table = got.block_tables.view(lagged_step.shape.num_seqs, -1)
    seq_of = np.repeat(np.arange(len(seqs)), np.diff(got.query_start.numpy()))
    pos = got.positions.numpy()
    assert got.slot_mapping.tolist() == (table[seq_of, pos // 4] * 4 + torch.from_numpy(pos % 4)).tolist()
    old = pos // 4 < np.array(held)[seq_of]
    assert (got.slot_mapping.numpy()[old] == want.slot_mapping.numpy()[old]).all() and old.any()


def test_the_memory_plan_counts_the_speculation_table():
    """The per-row state the KV plan leaves room for includes the rejected counts' table when
    speculative decoding is on (and only then: ``test_memory_plan.py`` checks it off)."""
    from tandem.worker.model_runner import ModelRunner
    llm = LLM("random:tiny", device="cpu", kv_cache_tokens=256, max_num_seqs=3, max_model_len=200,
              speculative_config=NGRAM)
    worker, runner = llm.engine.worker, llm.engine.worker.runner
    allocated = sum(t.numel() * t.element_size() for t in (runner.history, runner.next_tokens, runner.spec_lag.rejected))
    assert ModelRunner.state_bytes(worker.num_rows + 1, 200, speculative=True) == allocated
    assert ModelRunner.state_bytes(worker.num_rows + 1, 200) < allocated


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA executor and its graphs (run on a GPU)")
def test_on_cuda_with_graphs_sync_equals_async(shifted):
    """The stream executor with decode and piecewise graphs: the lagged steps resolve before their
    inputs are staged; sync and async make the same decisions and give the same tokens."""
    outs = []
    for async_batching in (False, True):
        llm = LLM("random:tiny", device="cuda", kv_cache_tokens=1024, async_batching=async_batching,
                  speculative_config=NGRAM)
        outs.append([o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)])
        assert llm.engine.core.spec_drains == 0 and llm.engine.core.spec_overlapped > 0
    assert outs[0] == outs[1] and shifted["rows"] > 0


def test_a_penalised_prefill_chunk_beside_speculating_rows_is_recorded():
    """A speculating sequence samples two rows while a penalised request's prompt is computed in
    chunks beside it: the step samples as many rows as it has sequences, and the chunk's tokens must
    still reach the device's token history (its penalties count them later). Float64: the logprobs
    of no speculation to the last bit."""
    prompts = [[11, 12, 13, 14] * 2, list(range(100, 160))]
    params = [SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, repetition_penalty=1.3,
                             presence_penalty=0.8, logprobs=3)]
    spec = NGRAM | {"num_speculative_tokens": 1}

    def run(spec):
        llm = LLM("random:tiny", kv_cache_tokens=512, dtype="float64", max_num_batched_tokens=8,
                  speculative_config=spec)
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [(o.outputs[0].token_ids, str(o.outputs[0].logprobs)) for o in outs], llm.engine.core.stats()

    off, _ = run(None)
    on, stats = run(spec)
    assert on == off and stats.spec_num_drafts > 0


def test_the_guess_reads_the_step_in_flight_off_the_known_tokens():
    """``_after_guess``: the step in flight accepts its proposals as far as the proposer's continuation
    of the known tokens agrees, draws the continuation's next token, and the new proposals follow."""
    from tandem.engine.speculation import _after_guess
    found = [5, 6, 7, 5, 6, 7, 5, 6]
    assert _after_guess(found, None, 3) == [5, 6, 7]  # nothing in flight
    assert _after_guess(found, [], 3) == [6, 7, 5]  # a plain decode in flight: its draw guessed
    assert _after_guess(found, [5, 6], 3) == [5, 6, 7]  # all accepted, then the bonus guessed
    assert _after_guess(found, [9, 9, 9], 3) == [6, 7, 5]  # planned on a wrong guess: none accepted


def test_acceptance_recovers_after_a_rejection(monkeypatch):
    """After a step that rejected, the step in flight was planned on a wrong guess; guessing "all
    accepted" again would be wrong step after step. Guessed from the known tokens, the overlapped
    schedule accepts nearly as often as the drained one (a random model departs from its loops)."""
    from tandem.spec import proposer
    prompts = [[11, 12, 13, 14] * 6, [5, 6, 7, 5, 6, 7, 5, 6], [40, 41, 40, 41, 40], [7, 8, 9, 10, 11] * 4] * 2
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    rates = {}
    for overlaps in (True, False):
        monkeypatch.setattr(proposer.NgramProposer, "overlaps", overlaps)
        llm = LLM("random:tiny", kv_cache_tokens=2048, speculative_config=NGRAM | {"disable_by_batch_size": 64})
        llm.generate(prompts, params, use_tqdm=False)
        stats = llm.engine.core.stats()
        rates[overlaps] = stats.spec_num_accepted_tokens / stats.spec_num_draft_tokens
        assert (llm.engine.core.spec_drains == 0) == overlaps
    assert rates[True] > 0.65 and rates[True] > rates[False] - 0.25, rates
