"""Rules only the host can decide, through the step's host mask (``engine/structured/rules.py``):
bad words of several tokens, a grammar together with ``allowed_token_ids`` / ``bad_words`` /
``min_tokens``, and a grammar that starts after the output's reasoning. Each holds with sampling on,
and async batching gives the same tokens as sync (``random:tiny``: its ids 0..255 are bytes)."""
from __future__ import annotations

import re

import pytest

from tandem import LLM, SamplingParams
from tandem import StructuredOutputsParams as S

T, H, E = 116, 104, 101  # "t", "h", "e"
EOS = 257  # random:tiny's


@pytest.fixture(scope="module")
def engines():
    return {mode: LLM("random:tiny", device="cpu", async_batching=mode, max_model_len=160, kv_cache_tokens=4096)
            for mode in (True, False)}


def _both(engines, prompts, params):
    outs = {mode: [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
            for mode, llm in engines.items()}
    assert [o.token_ids for o in outs[True]] == [o.token_ids for o in outs[False]]
    return outs[True]


def test_a_bad_word_of_several_tokens_never_appears_though_its_tokens_do(engines):
    pushed = {T: 6.0, H: 6.0, E: 6.0}  # the model would write t, h and e most of the time
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=64, ignore_eos=True, logit_bias=pushed,
                             bad_words=["the", "eh"]) for s in range(6)]
    free = [SamplingParams(temperature=1.0, seed=s, max_tokens=64, ignore_eos=True, logit_bias=pushed)
            for s in range(6)]
    outs = _both(engines, ["x"] * 12, params + free)
    words = ([T, H, E], [E, H])
    assert not any(_runs(o.token_ids, w) for o in outs[:6] for w in words)
    assert all({T, H, E} <= set(o.token_ids) for o in outs[:6])  # the ban is of the word, not of its tokens
    assert sum(_runs(o.token_ids, w) for o in outs[6:] for w in words) >= 3  # without the ban they come


def _runs(ids: list[int], word: list[int]) -> int:
    return sum(ids[i:i + len(word)] == word for i in range(len(ids)))


def test_a_grammar_meets_allowed_token_ids_bad_words_and_min_tokens(engines):
    regex = "[a-f]{1,12}"
    params = [SamplingParams(temperature=1.0, seed=1, max_tokens=20, allowed_token_ids=list(b"abc") + [EOS],
                             structured_outputs=S(regex=regex)),
              SamplingParams(temperature=1.0, seed=2, max_tokens=20, bad_words=["a", "b", "cd"],
                             structured_outputs=S(regex=regex)),
              SamplingParams(temperature=1.0, seed=3, max_tokens=20, min_tokens=8, structured_outputs=S(regex=regex))]
    allowed, banned, long_enough = _both(engines, ["hi"] * 3, params)
    assert set(allowed.text) <= set("abc") and re.fullmatch(regex, allowed.text)
    assert not set(banned.text) & set("ab") and "cd" not in banned.text and re.fullmatch(regex, banned.text)
    assert len(long_enough.token_ids) >= 8 and re.fullmatch(regex, long_enough.text)
    # three letters complete the grammar, which then allows only EOS, which min_tokens rules out
    conflict = SamplingParams(temperature=0.0, max_tokens=20, min_tokens=8, structured_outputs=S(regex="[a-f]{1,3}"))
    for llm in engines.values():
        with pytest.raises(ValueError, match="no token is left to sample at output index 3: .* min_tokens rule out"):
            llm.generate(["hi"], conflict, use_tqdm=False)


def test_the_grammar_starts_after_the_reasoning(engines):
    regex = "[0-9]{2,4}"
    after = [SamplingParams(temperature=1.0, seed=s, max_tokens=60, logit_bias={ord("|"): 6.0},
                            structured_outputs=S(regex=regex, reasoning_end="|")) for s in range(4)]
    opening = [SamplingParams(temperature=1.0, seed=s, max_tokens=60, logit_bias={ord("|"): 6.0, ord("~"): 4.0},
                              structured_outputs=S(regex=regex, reasoning_start="~", reasoning_end="|"))
               for s in range(8)]
    outs = _both(engines, ["think"] * 12, after + opening)
    for out in outs[:4]:
        reasoning, _, answer = out.text.partition("|")
        assert out.finish_reason == "stop" and re.fullmatch(regex, answer), out.text
    opened = [o.text for o in outs[4:] if o.text.startswith("~")]
    direct = [o.text for o in outs[4:] if not o.text.startswith("~")]
    assert opened and direct  # both ways happened
    assert all(re.fullmatch(regex, t.partition("|")[2]) for t in opened)
    assert all(re.fullmatch(regex, t) for t in direct)


def test_rules_are_checked_up_front(engines):
    llm = engines[True]
    with pytest.raises(ValueError, match="reasoning_start '<think>' is 7 tokens"):
        llm.generate(["hi"], SamplingParams(structured_outputs=S(regex="a", reasoning_start="<think>",
                                                                 reasoning_end="</think>")), use_tqdm=False)


def test_bad_words_that_ban_every_allowed_token_end_the_request_with_an_error(engines):
    """allowed_token_ids {a, b}; the bad words "ab" and "bb" leave nothing after a "b": an error naming them."""
    a, b = ord("a"), ord("b")
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, allowed_token_ids=[a, b],
                            bad_words_token_ids=[[b, a], [b, b]], logit_bias={b: 50.0})
    for llm in engines.values():
        with pytest.raises(ValueError, match="no token is left to sample at output index 1: allowed_token_ids or "
                                             "bad_words rule out every token"):
            llm.generate(["hi"], params, use_tqdm=False)
