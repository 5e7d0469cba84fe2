"""Speculative decoding for host-masked requests (structured output, bad words of several tokens):
a speculating sequence's rows are masked one per proposal, each in the state after the known tokens
and the proposals before it (``stepping.fill``'s ``ahead``); rows of a step planned on top of a
speculating one sample output indices the host resolves once that step is processed. The tokens are
those of no speculation, sync and async, with and without grammar worker processes."""
import dataclasses
import random
from collections import Counter

import numpy as np
import pytest

from differential import make_case, run_case_with_stats, with_constraints
from tandem.engine.structured import manager, rows, stepping
from tandem.engine.structured.rules import TokenRules
from tandem.llm import LLM
from tandem.sampling_params import SamplingParams, StructuredOutputsParams
from test_spec_decode import _repetitive, _with
from test_spec_overlap import on_equals_off

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


@pytest.fixture
def spied(monkeypatch):
    """Counts proposals the rules took or refused while masking rows, and lagged rows resolved back."""
    seen = {"taken": 0, "refused": 0, "shifted": 0}
    speculate, resolved = TokenRules.speculate, rows.resolved_gen_index

    def spy_speculate(self, tokens):
        ok = speculate(self, tokens)
        seen["taken" if ok else "refused"] += 1
        return ok

    def spy_resolved(seq, gen_index, ahead):
        out = resolved(seq, gen_index, ahead)
        seen["shifted"] += out < gen_index
        return out

    monkeypatch.setattr(TokenRules, "speculate", spy_speculate)
    monkeypatch.setattr(manager, "resolved_gen_index", spy_resolved)
    return seen


def _constrained(seed: int):
    """A randomized case (preemption, chunked prefill, prefix hits, aborts, penalties, seeded
    sampling) with most requests under a grammar or bad words, and prompts that repeat."""
    case = with_constraints(_repetitive(make_case(9100 + seed), seed), share=0.7)
    for r in case.requests:
        if r.params.structured_outputs is not None and r.params.max_tokens is not None:
            r.params = dataclasses.replace(r.params, max_tokens=max(r.params.max_tokens, 24))
    return case


@pytest.mark.parametrize("seed", (1, 2, 3, 5))
def test_constrained_requests_speculate_and_give_the_tokens_of_no_speculation(seed, spied):
    totals = Counter()
    on_equals_off(_constrained(seed), NGRAM | {"num_speculative_tokens": random.Random(seed).randint(2, 4)}, totals)
    assert totals["drafts"] > 0


def test_masked_rows_were_speculated_refused_and_resolved(spied):
    """Over the cases above: constrained rows were masked after proposals the grammar took and after
    ones it refused, and lagged rows were resolved back by rejected proposals."""
    for seed in (1, 2, 3, 5):
        case = _constrained(seed)
        run_case_with_stats(_with(case, NGRAM), async_batching=True)
    assert spied["taken"] > 0 and spied["refused"] > 0 and spied["shifted"] > 0, spied


# grammars whose outputs loop (greedy random weights fall into loops the n-gram then proposes), and
# bounded ones; prompts that repeat what the grammar allows
LOOPING = [(StructuredOutputsParams(regex=r"[0-9a-f ]*"), "0 1 0 1 0 1 0 1"),
           (StructuredOutputsParams(regex=r"(ab|cd|ef)*x"), "abcdabcdab"),
           (StructuredOutputsParams(regex=r"[a-z]{1,5}( [a-z]{1,5}){0,30}\."), "the cat the cat the"),
           (StructuredOutputsParams(json_object=True), '{"a": {"a": {"a": 1}}}')]


@pytest.mark.parametrize("workers, async_batching", [(0, False), (0, True), (1, True)])
def test_looping_constrained_outputs_accept_proposals_and_keep_their_tokens(workers, async_batching, spied):
    """Constrained requests alone, greedy and seeded, in the engine's process or a grammar worker's:
    proposals verified under per-proposal masks are accepted, and the tokens are those of no
    speculation (a mask filled in the wrong state would let an accepted draw break its grammar)."""
    prompts = [[ord(c) for c in text] for _, text in LOOPING for _ in (0, 1)]
    params = [SamplingParams(max_tokens=40, temperature=t, seed=5, structured_outputs=spec)
              for spec, _ in LOOPING for t in (0.0, 0.7)]
    common = dict(kv_cache_tokens=1024, dtype="float64", structured_output_workers=workers)
    off = LLM("random:tiny", **common).generate(prompts, params, use_tqdm=False)
    llm = LLM("random:tiny", **common, speculative_config=NGRAM, async_batching=async_batching)
    on = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in on] == [o.outputs[0].token_ids for o in off]
    stats = llm.engine.core.stats()
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    assert spied["taken"] > 0 or workers  # (a worker's rules are in its own process)


def test_a_row_after_proposals_is_masked_as_if_they_were_taken():
    """``stepping.fill`` with proposals ahead of rows equals masks filled by rules that took those
    tokens for real; the rules are back in their own state afterwards; a row after a refused
    proposal allows everything."""
    import xgrammar as xgr

    from tandem.engine.structured.compiler import GrammarCompiler
    from tandem.engine.structured.matcher import RequestGrammar
    from tandem.engine.structured.rules import rules_for
    from tandem.engine.structured.vocab import tokenizer_info

    model, eos = "random:tiny", frozenset({2})
    regex = r"[0-9]{2}[a-f]{2}[0-9 ]{0,9}x"
    compiler = GrammarCompiler(lambda: tokenizer_info(model, 512, eos), 1)
    compiled = compiler.compile(StructuredOutputsParams(regex=regex)).result()
    words = -(-512 // 32)
    params = SamplingParams(max_tokens=30, structured_outputs=StructuredOutputsParams(regex=regex))
    make = lambda: rules_for(params, RequestGrammar(compiled, [2]), words, eos)  # noqa: E731
    rng, walk, tokens = random.Random(0), make(), []
    for _ in range(6):  # a random path through the language: 3 known tokens, 3 proposals
        tokens.append(rng.choice([t for t in range(512) if t != 2 and _allows(walk, t, words, len(tokens))]))
        assert walk.advance(tokens[-1:]) is None
    refused = next(t for t in range(512) if not _allows(walk, t, words, 6))
    known, proposals = tokens[:3], tokens[3:] + [refused]
    rules = make()
    assert rules.advance(known) is None
    before = np.zeros((1, words), np.int32)
    rules.fill(before, 0, len(known))
    got = np.zeros((len(proposals) + 1, words), np.int32)
    entries = [(j, rules, len(known) + j, tuple(proposals[:j])) for j in range(len(proposals) + 1)]
    assert stepping.fill(entries, got, xgr.BatchGrammarMatcher(1)) == []
    for j in range(len(proposals)):
        want = np.zeros((1, words), np.int32)
        reference = make()
        assert reference.advance(known + proposals[:j]) is None
        reference.fill(want, 0, len(known) + j)
        assert (got[j] == want[0]).all(), j
    assert (got[len(proposals)] == -1).all()  # after the refused proposal: everything
    assert len({got[j].tobytes() for j in range(len(proposals))}) > 1  # (the proposals move the grammar)
    after = np.zeros((1, words), np.int32)
    rules.fill(after, 0, len(known))
    assert rules.num_accepted == rules.known == len(known) and (after == before).all()
    compiler.shutdown()


def _allows(rules: TokenRules, token: int, words: int, gen_index: int) -> bool:
    mask = np.zeros((1, words), np.int32)
    rules.fill(mask, 0, gen_index)
    return bool((mask[0].view(np.uint32)[token >> 5] >> np.uint32(token & 31)) & 1)


@pytest.mark.parametrize("params, safe", [
    (SamplingParams(structured_outputs=StructuredOutputsParams(choice=["a", "b"])), True),
    (SamplingParams(bad_words=["ab cd"]), True),
    (SamplingParams(structured_outputs=StructuredOutputsParams(choice=["a"]), bad_words=["ab cd"]), False),
    (SamplingParams(structured_outputs=StructuredOutputsParams(choice=["a"]), allowed_token_ids=[1, 2]), False),
    (SamplingParams(bad_words=["ab cd"], allowed_token_ids=[1, 2]), False),
])
def test_only_requests_whose_rows_always_keep_a_token_speculate(params, safe):
    assert rows.speculation_safe(params) is safe
