"""Speculative decoding (docs/pipeline.md, "Speculative decoding"): the same tokens as without it,
greedy and seeded, sync and async, with preemption, prefix caching, aborts and structured output;
the same output distribution when sampling; the options checked."""
import dataclasses
import random

import numpy as np
import pytest
from scipy.stats import chi2_contingency

from differential import compare, make_case, run_case_with_stats, speculative_config
from tandem.config import EngineConfig
from tandem.engine.spec_path import accepted_count
from tandem.llm import LLM
from tandem.sampling_params import SamplingParams
from tandem.spec.config import parse_speculative_config
from tandem.spec.proposer import ngram_lookup

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


@pytest.mark.parametrize("bad, says", [
    ({"method": "ngram", "num_speculative_tokens": 2, "k": 3}, "unknown key(s) ['k']"),
    ({"method": "eagle", "num_speculative_tokens": 2}, "'eagle' is not built"),
    ({"method": "draft", "num_speculative_tokens": 2}, "needs \"model\""),
    ({"method": "ngram"}, "num_speculative_tokens is required"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be an integer >= 1"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     "prompt_lookup_min (4) is above"),
    ("{not json", "not valid JSON"),
])
def test_bad_configs_are_refused_naming_what_is_wrong(bad, says):
    with pytest.raises(ValueError) as e:
        EngineConfig(model="random:tiny", speculative_config=bad)
    assert says in str(e.value)


def test_vllm_shapes_parse():
    assert parse_speculative_config('{"method": "[ngram]", "num_speculative_tokens": 4}').method == "ngram"
    draft = parse_speculative_config({"model": "random:tiny", "num_speculative_tokens": 2})
    assert (draft.method, draft.model, draft.disable_by_batch_size) == ("draft", "random:tiny", 32)


def test_ngram_lookup_takes_the_longest_recent_match():
    tokens = [7, 1, 2, 3, 9, 9, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    assert ngram_lookup(tokens, 1, 3, 2) == [4, 5]  # "1 2 3" last seen before "4 5"
    assert ngram_lookup(tokens, 1, 3, 5) == [4, 5, 0, 1, 2]
    assert ngram_lookup([5, 6, 7], 1, 2, 3) == []  # nothing recurs
    assert ngram_lookup([4, 8, 4], 2, 2, 3) == []  # a 2-gram must match; only a 1-gram does
    assert ngram_lookup([4, 8, 4], 1, 2, 3) == [8, 4, 8]  # past the end: the loop goes on
    assert ngram_lookup([3, 9, 9, 9], 1, 2, 4) == [9, 9, 9, 9]


def _lookup_by_definition(tokens, min_n, max_n, k):
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        for end in range(len(tokens) - 2, n - 2, -1):  # the most recent earlier occurrence first
            if tokens[end - n + 1:end + 1] == tokens[-n:]:
                out = tokens[end + 1:end + 1 + k]
                while len(out) < k:
                    out.append(out[len(out) - (len(tokens) - end - 1)])
                return out
    return []


def test_ngram_lookup_follows_its_definition():
    """The array search (last-token candidates extended backwards) against the plain definition, and
    the proposer's growing per-request arrays against the lookup on the whole list."""
    from tandem.spec.proposer import NgramProposer, ProposalRequest
    rng = random.Random(0)
    for _ in range(500):
        tokens = [rng.randrange(rng.choice([2, 3, 20])) for _ in range(rng.randint(1, 40))]
        low = rng.randint(1, 4)
        high, k = rng.randint(low, 5), rng.randint(1, 5)
        assert ngram_lookup(tokens, low, high, k) == _lookup_by_definition(tokens, low, high, k), tokens
    proposer, tokens = NgramProposer(1, 3), [1, 2, 3]
    for _ in range(200):
        tokens.append(rng.randrange(4))
        assert proposer.propose([ProposalRequest("a", list(tokens), 3)]) == [ngram_lookup(tokens, 1, 3, 3)]


def _with(case, spec):
    case = dataclasses.replace(case, engine=dict(case.engine))
    case.engine.pop("speculative_config", None)
    if spec is not None:
        case.engine["speculative_config"] = spec
    return case


def _repetitive(case, seed):
    """Prompts that end in repeated spans (n-gram lookup proposes from the start), and longer runs
    (more tokens, fewer stop ids) for the speculation to verify."""
    rng = random.Random(f"repeat-{seed}")
    for r in case.requests:
        span = r.prompt[:rng.randint(2, 6)]
        r.prompt = (r.prompt + span * rng.randint(2, 5))[-48:]
        if r.params.max_tokens is not None:
            room = case.engine["kv_cache_tokens"] - len(r.prompt)
            r.params = dataclasses.replace(r.params, max_tokens=min(r.params.max_tokens + 16, room),
                                           stop_token_ids=r.params.stop_token_ids[:3])
    return case


@pytest.mark.parametrize("seed", (8, 9, 11, 14, 19, 21, 22, 29))
def test_speculation_gives_the_tokens_of_no_speculation(seed):
    """Randomized cases (preemption from tiny KV caches, chunked prefill, prefix caching, aborts, stop
    strings and ids, min_tokens, penalties, logit bias, logprobs, structured output, n > 1; greedy and
    seeded sampling): speculation on, sync and async, equals it off; an abort at a loop step may cut
    a request elsewhere when the runs advance at other speeds."""
    case = _repetitive(make_case(5000 + seed), seed)
    spec = speculative_config(random.Random(seed)) | {"disable_by_batch_size": 32}
    off, _ = run_case_with_stats(_with(case, None), async_batching=True)
    on_sync, stats = run_case_with_stats(_with(case, spec), async_batching=False)
    on_async, stats_async = run_case_with_stats(_with(case, spec), async_batching=True)
    assert not compare(case, on_sync, on_async), case.describe()  # the same decisions: exactly equal
    assert stats == stats_async or (stats.spec_num_drafts == stats_async.spec_num_drafts)
    problems = compare(case, off, on_sync, ("off", "on"), aborts_may_differ=True, logprob_atol=1e-9)
    assert not problems, case.describe() + "\n" + "\n".join(problems)
    assert stats.spec_num_draft_tokens >= stats.spec_num_accepted_tokens >= 0


def test_greedy_repetition_is_accepted_and_counted():
    """A greedy loop of a random model: n-gram proposals are mostly accepted, and the core says so."""
    prompt = [11, 12, 13, 14] * 6
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    off = LLM("random:tiny", kv_cache_tokens=512).generate([prompt], params, use_tqdm=False)
    llm = LLM("random:tiny", kv_cache_tokens=512, speculative_config=NGRAM)
    on = llm.generate([prompt], params, use_tqdm=False)
    assert on[0].outputs[0].token_ids == off[0].outputs[0].token_ids
    stats = llm.engine.core.stats()
    assert stats.spec_num_drafts > 0 and stats.spec_num_accepted_tokens > 0
    assert stats.spec_num_accepted_tokens <= stats.spec_num_draft_tokens


def _draws(spec, seeds, allowed, prompt):
    llm = LLM("random:tiny", kv_cache_tokens=4096, max_num_seqs=64, speculative_config=spec)
    params = [SamplingParams(max_tokens=4, temperature=1.0, seed=s, allowed_token_ids=allowed, ignore_eos=True)
              for s in seeds]
    outs = llm.generate([prompt] * len(seeds), params, use_tqdm=False)
    return np.array([o.outputs[0].token_ids for o in outs]), llm.engine.core.stats()


def test_sampled_distribution_is_unchanged():
    """2000 seeded draws of the tokens at output indices 1-3 (the positions speculation verifies),
    with and without speculation, from disjoint seeds: a chi-square test of homogeneity per position
    (and, being exact, the same seeds give the same tokens)."""
    allowed = [40, 41, 42, 43, 44, 45]
    prompt = [40, 41, 42, 43, 44, 45] * 3
    spec = NGRAM | {"disable_by_batch_size": 2000}
    on, stats = _draws(spec, range(1000), allowed, prompt)
    off, _ = _draws(None, range(1000, 2000), allowed, prompt)
    assert stats.spec_num_drafts > 0 and 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    for position in (1, 2, 3):
        table = np.array([[np.sum(x[:, position] == t) for t in allowed] for x in (on, off)])
        table = table[:, table.sum(axis=0) > 0]
        assert chi2_contingency(table).pvalue > 1e-3, table
    same_seeds, _ = _draws(None, range(100), allowed, prompt)
    assert (same_seeds == on[:100]).all()


@pytest.mark.parametrize("async_batching", [False, True])
def test_a_draft_equal_to_the_target_is_always_accepted(async_batching):
    prompts = [[11, 12, 13, 14, 99, 7] * 3, [5, 6, 7, 8, 9]]
    params = [SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=23, temperature=0.8, seed=5, ignore_eos=True)]
    off = LLM("random:tiny", kv_cache_tokens=512).generate(prompts, params, use_tqdm=False)
    llm = LLM("random:tiny", kv_cache_tokens=512, async_batching=async_batching,
              speculative_config={"method": "draft", "model": "random:tiny", "num_speculative_tokens": 3})
    on = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in on] == [o.outputs[0].token_ids for o in off]
    assert llm.engine.core.stats().spec_num_drafts > 0
    greedy = LLM("random:tiny", kv_cache_tokens=512, async_batching=async_batching,
                 speculative_config={"method": "draft", "model": "random:tiny", "num_speculative_tokens": 3})
    greedy.generate(prompts, params[0], use_tqdm=False)
    stats = greedy.engine.core.stats()
    assert stats.spec_num_draft_tokens > 0 and stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens


@pytest.mark.parametrize("seed", (9, 16))
def test_a_different_draft_gives_the_same_tokens(seed):
    """A draft of another family (its own random weights, the same vocabulary): few proposals are
    accepted, and the outputs are those of no speculation (preemption, aborts, constraints)."""
    case = _repetitive(make_case(5000 + seed), seed)
    spec = {"method": "draft", "model": "random:tiny-gemma2", "num_speculative_tokens": 2}
    off, _ = run_case_with_stats(_with(case, None), async_batching=True)
    on_sync, stats = run_case_with_stats(_with(case, spec), async_batching=False)
    on_async, _ = run_case_with_stats(_with(case, spec), async_batching=True)
    assert not compare(case, on_sync, on_async), case.describe()
    problems = compare(case, off, on_async, ("off", "on"), aborts_may_differ=True, logprob_atol=1e-9)
    assert not problems, case.describe() + "\n" + "\n".join(problems)
    assert stats.spec_num_drafts > 0


def test_accept_by_match_counts_the_leading_matches():
    import torch

    from tandem.spec.verify import accept_by_match
    drawn = torch.tensor([[5, 6, 7, 8], [5, 0, 7, 8], [1, 6, 7, 8]])
    proposals = torch.tensor([[5, 6, 7], [5, 6, 7], [5, 6, 7]])
    assert accept_by_match(drawn, proposals).tolist() == [3, 1, 0]
    assert [accepted_count(d.numpy(), p.tolist()) for d, p in zip(drawn, proposals)] == [3, 1, 0]  # the host's


def test_rejection_sampling_keeps_the_target_distribution():
    """The general rule (a proposer sampling from q, not one-hot): the first token follows p[0], and
    the second, after an accepted first, p[1] (chi-square goodness of fit, 4000 draws)."""
    import torch
    from scipy.stats import chisquare

    from tandem.spec.verify import rejection_sample
    g = torch.Generator().manual_seed(0)
    vocab, k, n = 6, 2, 4000
    p = torch.rand(k + 1, vocab, generator=g, dtype=torch.float64).softmax(-1)
    q = (3 * torch.rand(k, vocab, generator=g, dtype=torch.float64)).softmax(-1)
    first, second = np.zeros(vocab), np.zeros(vocab)
    for _ in range(n):
        proposals = torch.stack([torch.multinomial(q[j], 1, generator=g)[0] for j in range(k)])
        tokens, count = rejection_sample(p, q, proposals, torch.rand(k, generator=g, dtype=torch.float64),
                                         torch.empty(k + 1, vocab, dtype=torch.float64).exponential_(generator=g))
        first[int(tokens[0])] += 1
        if int(count) >= 1:
            second[int(tokens[1])] += 1
    assert chisquare(first, p[0].numpy() * n).pvalue > 1e-3
    assert chisquare(second, p[1].numpy() * second.sum()).pvalue > 1e-3
    assert 0 < second.sum() < n  # both branches ran


def _scheduler(num_blocks=64):
    from tandem.engine.block_manager import BlockManager, RowPool
    from tandem.engine.scheduler import Scheduler
    return Scheduler(8, 64, BlockManager(num_blocks, 4), RowPool(16), eos_token_ids=frozenset({3}))


def _decoding(s, prompts=((10, 11, 12, 13, 14),), max_new=20):
    """Sequences "a", "b"... after their prefill step, their first token (20) known: they decode next."""
    from tandem.contract.step import StepOutput
    from tandem.engine.scheduler import StepDeltas
    from tandem.engine.sequence import Sequence
    seqs = [Sequence("ab"[i], list(p), SamplingParams(), seed=0, max_new_tokens=max_new) for i, p in enumerate(prompts)]
    for seq in seqs:
        s.add(seq)
    out = s.schedule()
    s.update(out, StepOutput(out.step_id, [20] * len(seqs)), StepDeltas())
    return seqs[0] if len(seqs) == 1 else seqs


def _run(s, proposals, drawn):
    from tandem.contract.step import StepOutput
    from tandem.engine.scheduler import StepDeltas
    out = s.schedule(proposals)
    deltas = StepDeltas()
    s.update(out, StepOutput(out.step_id, np.array(drawn)), deltas)
    return out, deltas


def test_the_scheduler_rolls_back_to_what_was_accepted():
    s = _scheduler()
    seq = _decoding(s)  # 5 prompt tokens + 1 output: positions 0..5, 5 computed
    out, deltas = _run(s, {"a": [21, 22, 23]}, [21, 22, 9, 24])  # two accepted, then 9 drawn
    (item,) = out.chunks
    assert (item.start, item.num_tokens, item.num_samples, item.proposals) == (5, 4, 4, [21, 22, 23])
    assert deltas.token_ids == [21, 22, 9] and seq.output_token_ids == [20, 21, 22, 9]
    assert (seq.num_computed, seq.num_tokens, seq.num_pending) == (8, 9, 0)  # 9 is computed next
    assert len(seq.block_ids) == 3  # blocks for the worst case (positions through 8) stay with it
    out, deltas = _run(s, {"a": [30, 31]}, [30, 31, 32])  # all accepted, and the bonus token
    assert deltas.token_ids == [30, 31, 32] and (seq.num_computed, seq.num_tokens) == (11, 12)
    assert s.spec_stats.num_drafts == 2 and s.spec_stats.num_draft_tokens == 5
    assert s.spec_stats.num_accepted_tokens == 4 and s.spec_stats.tokens_per_step == 3.0


def test_a_stop_inside_the_accepted_run_ends_the_request_there():
    s = _scheduler()
    seq = _decoding(s, max_new=4)
    out, deltas = _run(s, {"a": [21, 3, 23]}, [21, 3, 23, 24])  # EOS (3) accepted second: the rest dropped
    assert out.chunks[0].proposals == [21, 3]  # max_new 4: one output and at most 3 more tokens
    assert seq.output_token_ids == [20, 21, 3] and deltas.finished == {"a": "stop"}


def test_proposals_wait_for_free_blocks_and_never_preempt():
    s = _scheduler(num_blocks=4)  # 3 usable blocks of 4 tokens
    # a: 3 prompt tokens + 1 output (one block, position 3 computed next); b: 5 + 1 (two blocks)
    a, b = _decoding(s, ((10, 11, 12), (10, 11, 12, 13, 14)))
    out, _ = _run(s, {"a": [21, 22, 23], "b": [21]}, [21, 5, 21])
    sizes = {i.seq.request_id: i.num_tokens for i in out.chunks}
    assert sizes == {"a": 1, "b": 2}  # a's proposals would need a block that is not free
    assert a.status.value == b.status.value == "running" and s.num_preemptions == 0


def test_features_hold_under_speculation():
    """Logprobs, penalties, min_tokens, logit bias, stop strings and ids, n > 1 (seeded samples): the
    outputs, texts and logprobs of no speculation, on prompts whose loops n-gram lookup proposes."""
    loop = [11, 12, 13, 14] * 5
    params = [SamplingParams(max_tokens=30, temperature=0.0, logprobs=3, ignore_eos=True),
              SamplingParams(max_tokens=30, temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.4,
                             presence_penalty=0.2, ignore_eos=True),
              SamplingParams(max_tokens=30, temperature=0.0, min_tokens=12, stop_token_ids=[12, 13]),
              SamplingParams(max_tokens=30, temperature=0.9, seed=7, n=3, logit_bias={12: 4.0}, logprobs=1),
              SamplingParams(max_tokens=40, temperature=0.0, stop=["e", "q"], include_stop_str_in_output=True)]
    prompts = [loop, loop[:9], loop, loop[2:], [65, 66, 65, 66, 65, 66]]

    def run(spec):
        # float64: the logprobs too are equal to the last bit (float32 rounds other batch shapes apart)
        llm = LLM("random:tiny", kv_cache_tokens=1024, dtype="float64", speculative_config=spec)
        outs = llm.generate(prompts, params, use_tqdm=False)
        flat = [(c.token_ids, c.text, c.finish_reason, str(c.logprobs)) for o in outs for c in o.outputs]
        return flat, llm.engine.core.stats()

    off, _ = run(None)
    on, stats = run(NGRAM | {"num_speculative_tokens": 4})
    assert on == off
    assert stats.spec_num_accepted_tokens > 0


@pytest.mark.parametrize("seed", (1, 2, 5, 10))  # cases with hits, accepted proposals and preemption
def test_shared_prefixes_with_speculation(seed):
    """Prefix caching registers only blocks whose K/V is right: a block filled by an accepted run holds
    the rejected proposal's K/V at the drawn token's position until the next step; prompts that share
    prefixes (and repeat whole) with speculation give the tokens of no speculation and no caching."""
    from differential import run_case, with_shared_prefixes
    case = with_shared_prefixes(_repetitive(make_case(6000 + seed), seed))
    spec = speculative_config(random.Random(seed)) | {"disable_by_batch_size": 32}
    base = run_case(_with(case, None), async_batching=True, prefix_caching=False)
    on, stats = run_case_with_stats(_with(case, spec), async_batching=True)
    problems = compare(case, base, on, ("off", "on"), aborts_may_differ=True, logprob_atol=1e-9)
    assert not problems, case.describe() + "\n" + "\n".join(problems)
    assert stats.prefix_cache_hits > 0 and stats.spec_num_drafts > 0


@pytest.mark.parametrize("end", [0, 1, 2])
def test_a_request_ending_on_a_drawn_token_leaves_no_stale_block_in_the_cache(end):
    """When a speculating step rejects, the drawn token's position holds the rejected proposal's K/V
    until the next step computes it; when the request ends on that token (a stop id) and it fills a
    block, no step does, so that block must not enter the prefix cache. A second request whose prompt
    is the first's prompt and output reads the cache: its logprobs equal those of an engine without
    caching (float64, to the last bit). A draft of another family: nearly every proposal rejected."""
    first = [21, 22, 23, 24, 25, 26, 27]
    options = {"kv_cache_tokens": 512, "block_size": 4, "dtype": "float64"}
    spec = {"method": "draft", "model": "random:tiny-gemma2", "num_speculative_tokens": 3}
    free = LLM("random:tiny", **options, speculative_config=spec).generate(
        [first], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    # the end-th output token that fills a block and did not come out before: it stops the request
    ends = [i for i in range(2, len(free)) if (len(first) + i + 1) % 4 == 0 and free[i] not in free[:i]]
    stop = free[ends[end]]
    llm = LLM("random:tiny", **options, speculative_config=spec)
    out = llm.generate([first], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop_token_ids=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == free[:ends[end] + 1] and out.finish_reason == "stop"
    stats = llm.engine.core.stats()
    assert stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    second = first + out.token_ids + [30]
    probe = SamplingParams(max_tokens=3, temperature=0.0, logprobs=2, ignore_eos=True)
    cached = llm.generate([second], probe, use_tqdm=False)[0]
    assert llm.engine.core.stats().prefix_cache_hits > 0
    fresh = LLM("random:tiny", **options, enable_prefix_caching=False).generate([second], probe, use_tqdm=False)[0]
    assert str(cached.outputs[0].logprobs) == str(fresh.outputs[0].logprobs)


def test_speculation_backs_off_while_nothing_is_proposed():
    """Text that never repeats: n-gram lookup has nothing, and after each empty try speculation sits
    out 1, 2, 4 .. 16 steps (those steps pipeline as without it)."""
    from tandem.engine.spec_path import SpecStats
    from tandem.engine.speculation import Speculation
    from tandem.spec.config import parse_speculative_config
    from tandem.spec.proposer import NgramProposer

    class Running:
        def __init__(self):
            from tandem.engine.sequence import Sequence
            self.running = [Sequence("a", list(range(100, 140)), SamplingParams(), seed=0, max_new_tokens=500)]
            self.running[0].num_computed = 39  # decoding, every token known
            self.num_running, self.num_waiting = 1, 0
            self.spec_stats = SpecStats()

    spec = Speculation(parse_speculative_config(NGRAM), NgramProposer(1, 3))
    s = Running()
    tried = []
    for step in range(60):
        if spec.wants(s):
            tried.append(step)
            assert spec.propose(s) == {}
    assert tried == [0, 2, 5, 10, 19, 36, 53]
    s.running[0].output_token_ids.append(100)  # now the last token recurs: proposals again
    s.running[0].num_computed = 40
    while not spec.wants(s):
        pass
    assert spec.propose(s) == {"a": [101, 102, 103]} and spec.wants(s)


def test_speculation_backs_off_while_its_proposals_are_rejected():
    """Proposals found but rejected (a random model does not continue the text it looks up): each
    speculating step that gains less than its own cost sends speculation into the same back-off; one
    that gains enough resets it."""
    from tandem.engine.sequence import Sequence
    from tandem.engine.spec_path import SpecStats
    from tandem.engine.speculation import JUDGE_WINDOW, Speculation, break_even_gain
    from tandem.spec.config import parse_speculative_config
    from tandem.spec.proposer import NgramProposer

    class Running:
        def __init__(self):
            self.running = [Sequence("a", [5, 6, 7] * 10, SamplingParams(), seed=0, max_new_tokens=500)]
            self.running[0].num_computed = 29
            self.num_running, self.num_waiting, self.spec_stats = 1, 0, SpecStats()

    assert break_even_gain(1) < break_even_gain(8) < break_even_gain(32) < 0.5
    spec, s = Speculation(parse_speculative_config(NGRAM), NgramProposer(1, 3)), Running()
    tried = []
    for step in range(JUDGE_WINDOW + 40):
        if spec.wants(s):
            tried.append(step)
            assert spec.propose(s) == {"a": [5, 6, 7]}
            s.spec_stats.num_drafts += 1  # the step is processed: nothing accepted
            s.spec_stats.num_draft_tokens += 3
    w = JUDGE_WINDOW  # a window of rejected steps, then sitting out 1, 2, 4 .. steps, each try judged alone
    assert tried[:w] == list(range(w)) and tried[w:w + 4] == [w + 1, w + 4, w + 9, w + 18]
    spec, s = Speculation(parse_speculative_config(NGRAM), NgramProposer(1, 3)), Running()
    for step in range(3 * JUDGE_WINDOW):  # every window gains 2 tokens a step: it never sits out
        assert spec.wants(s) and spec.propose(s)
        s.spec_stats.num_drafts += 1
        s.spec_stats.num_accepted_tokens += 2


def test_the_draft_models_work_lies_inside_the_steps(monkeypatch):
    """The draft proposes on the device as the first op of the step that verifies its proposals, so
    its forwards are part of that step's device time: the device lane holds the steps and nothing
    between them, in whichever loop runs, and the benchmark's per-step figures include the draft."""
    import tandem.bench.measure as measure
    from tandem.bench.api import bench

    seen = {}
    real = measure.summarise

    def spy(mode, wall, records, intervals, *args, **kwargs):
        seen[mode] = ([i.step_id for i in intervals], {r.step_id for r in records})
        return real(mode, wall, records, intervals, *args, **kwargs)

    monkeypatch.setattr(measure, "summarise", spy)
    out = bench("random:tiny", modes=["sync", "async"], num_requests=2, prompt_len=24, max_tokens=16, progress=False,
                speculative_config={"method": "draft", "model": "random:tiny", "num_speculative_tokens": 3})
    assert set(seen) == {"sync", "async"}
    for mode, (ids, steps) in seen.items():
        assert sorted(ids) == sorted(steps), mode
        assert out["modes"][mode]["num_steps"] == len(steps)
        assert out["modes"][mode]["spec_draft_tokens"] > 0, mode
