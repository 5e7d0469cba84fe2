"""``allowed_token_ids`` and ``bad_words`` (issue 23): validated and tokenized by the InputProcessor,
carried to the device as logit-bias entries (-inf bans a token, +inf marks an allowed one), applied
there without a host sync; bad words of several tokens through the host mask (tests/test_host_rules.py). Outputs stay inside the restriction with sampling on, and async batching
gives the same tokens as sync with restricted and free requests side by side."""
from __future__ import annotations

import math

import pytest
import torch

from tandem import LLM, SamplingParams
from tandem.worker.logits_processing import apply_logit_bias

ALLOWED = [104, 105, 300, 301]


def test_apply_logit_bias_keeps_only_the_marked_tokens_of_marked_rows():
    logits = torch.zeros(3, 6)
    rows = torch.tensor([0, 0, 1, 1, 1, 2])
    tokens = torch.tensor([1, 2, 3, 3, 4, 5])  # row 1 marks token 3 twice and bans token 4
    values = torch.tensor([math.inf, 2.0, math.inf, math.inf, -math.inf, 1.0])
    apply_logit_bias(logits, rows, tokens, values, allowed_tokens=True)
    inf = math.inf
    assert logits.tolist() == [[-inf, 0, -inf, -inf, -inf, -inf], [-inf, -inf, -inf, 0, -inf, -inf],
                               [0, 0, 0, 0, 0, 1]]


def test_sampling_params_check_and_copy_the_restrictions():
    p = SamplingParams(allowed_token_ids=[3, 1], bad_words=["x"], logit_bias={5: 1.0})
    copy = p.checked_copy()
    assert copy.allowed_token_ids == [3, 1] and copy.allowed_token_ids is not p.allowed_token_ids
    assert SamplingParams(logit_bias={5: 1.0}, allowed_token_ids=[3, 1],
                          bad_words_token_ids=[[7]]).bias_entries() == ([5, 7, 1, 3], [1.0, -inf_, inf_, inf_])
    for bad, name in ((dict(allowed_token_ids=[]), "allowed_token_ids"), (dict(allowed_token_ids=[-1]),
                      "allowed_token_ids"), (dict(bad_words=[" "]), "bad_words"), (dict(bad_words="x"), "bad_words"),
                      (dict(allowed_token_ids=[True]), "allowed_token_ids")):
        with pytest.raises(ValueError, match=f"SamplingParams.{name}"):
            SamplingParams(**bad)


inf_ = math.inf


@pytest.fixture(scope="module")
def engines():
    """The byte-tokenizer preset, async and sync (its ids 0..255 are bytes: 'e' is 101)."""
    return {mode: LLM("random:tiny", device="cpu", async_batching=mode, max_model_len=128, kv_cache_tokens=2048)
            for mode in (True, False)}


def _requests():
    free = SamplingParams(temperature=1.0, seed=5, max_tokens=24, ignore_eos=True)
    return [free,
            SamplingParams(temperature=1.0, seed=1, max_tokens=24, ignore_eos=True, allowed_token_ids=ALLOWED,
                           logprobs=2),
            SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, allowed_token_ids=ALLOWED),
            # the bias pushes 'e' and 'a' to the top: only the ban keeps them out
            SamplingParams(temperature=1.0, seed=2, max_tokens=24, ignore_eos=True, bad_words=["e", " a"],
                           logit_bias={101: 30.0, 97: 30.0, 122: 5.0}),
            SamplingParams(temperature=0.7, seed=3, max_tokens=24, ignore_eos=True, allowed_token_ids=[101, 122, 300],
                           bad_words=["e"], frequency_penalty=0.5),
            free]


def test_outputs_respect_the_restrictions_and_async_equals_sync(engines):
    prompts = ["hello there", "abc", "the cat", "zzz", "e e e", "hello there"]
    outs = {mode: [o.outputs[0] for o in llm.generate(prompts, _requests(), use_tqdm=False)]
            for mode, llm in engines.items()}
    assert [o.token_ids for o in outs[True]] == [o.token_ids for o in outs[False]]
    free, sampled, greedy, banned, both, again = outs[True]
    assert set(sampled.token_ids) <= set(ALLOWED) and len(set(sampled.token_ids)) > 1  # sampled, not stuck
    assert set(greedy.token_ids) <= set(ALLOWED)
    assert not {101, 97} & set(banned.token_ids) and 122 in banned.token_ids  # the other biased token comes
    assert set(both.token_ids) <= {122, 300}
    assert free.token_ids == again.token_ids and not set(free.token_ids) <= set(ALLOWED)
    for entry in sampled.logprobs:  # alternatives outside the allowed set have no probability
        assert all(lp.logprob == -math.inf for t, lp in entry.items() if t not in ALLOWED)


def test_the_input_processor_refuses_what_it_cannot_honour(engines):
    llm = engines[True]
    cases = [(SamplingParams(allowed_token_ids=[3, 10**6]), "allowed_token_ids has token ids outside"),
             (SamplingParams(allowed_token_ids=[101], bad_words=["e"]), "bans every token of allowed_token_ids")]
    for params, message in cases:
        with pytest.raises(ValueError, match=message):
            llm.generate(["hi"], params, use_tqdm=False)
