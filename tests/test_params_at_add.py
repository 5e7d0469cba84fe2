"""Issue 21, points 10 and 14: seeds are distinct over the whole accepted range, and SamplingParams
changed after construction are validated when the request is added (offline as in the server)."""
import math

import pytest
import torch

from tandem import LLM, SamplingParams
from tandem.sampling_params import SEED_MAX, SEED_MIN


@pytest.fixture(scope="module")
def llm():
    return LLM("random:tiny", device="cpu", max_model_len=64, kv_cache_tokens=2048)


def _prompt(seed: int, n: int = 7) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _sampled(llm: LLM, seed: int) -> list[int]:
    params = SamplingParams(temperature=1.5, seed=seed, max_tokens=16, ignore_eos=True)
    return llm.generate([_prompt(3)], params, use_tqdm=False)[0].outputs[0].token_ids


def test_seeds_differing_only_in_the_top_bit_draw_different_tokens(llm):
    # the engine masked seeds to 63 bits: 0 and -2**63 (bit 63 set) drew the same noise
    draws = {seed: tuple(_sampled(llm, seed)) for seed in (0, SEED_MIN, -1, SEED_MAX)}
    assert len(set(draws.values())) == len(draws)
    assert tuple(_sampled(llm, SEED_MIN)) == draws[SEED_MIN]  # and each one is reproducible


@pytest.mark.parametrize("seed", [SEED_MAX + 1, 2**64 - 1, SEED_MIN - 1])
def test_seeds_outside_the_signed_64_bit_range_are_refused(llm, seed):
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=seed)
    params = SamplingParams()
    params.seed = seed
    with pytest.raises(ValueError, match="seed"):
        llm.generate([[1, 2, 3]], params, use_tqdm=False)


@pytest.mark.parametrize("field, value", [
    ("temperature", math.nan), ("max_tokens", 0), ("max_tokens", -3), ("logit_bias", {-1: 5.0}),
    ("min_p", 2.0), ("logprobs", 1000), ("n", 0), ("top_p", 0.0), ("stop", [""]), ("stop_token_ids", [-2]),
    ("ignore_eos", "yes"), ("seed", 2**63)])
def test_a_field_changed_after_construction_is_checked_when_the_request_is_added(llm, field, value):
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    setattr(params, field, value)
    with pytest.raises(ValueError, match=field):
        llm.generate([[1, 2, 3]], params, use_tqdm=False)
    with pytest.raises(ValueError, match=field):
        llm.engine.add_request("changed", None, params, [1, 2, 3])
    assert not llm.engine.has_unfinished_requests()  # nothing was queued
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4  # and the engine goes on


def test_a_valid_change_after_construction_takes_effect(llm):
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    params.max_tokens, params.stop, params.stop_token_ids = 9, "zz", (7,)
    request = llm.engine.validate_request("valid-change", None, params, [1, 2, 3])
    # what the constructor derives is derived again
    assert (request.max_new_tokens, request.params.stop_strings, request.params.stop_token_ids) == (9, ["zz"], [7])
    assert request.params is not params


def test_changes_after_the_request_was_added_do_not_reach_it(llm):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = llm.generate([_prompt(8)], params, use_tqdm=False)[0].outputs[0].token_ids
    llm.engine.add_request("mutated", None, params, _prompt(8))
    params.max_tokens, params.temperature, params.logit_bias = 2, 1.0, {expected[1]: -100.0}
    outputs = []
    while llm.engine.has_unfinished_requests():
        outputs += [o for o in llm.engine.step() if o.finished]
    assert outputs[0].outputs[0].token_ids == expected


def test_max_tokens_beyond_the_context_is_refused_offline_as_in_the_server(llm):
    prompt = _prompt(4, 20)
    with pytest.raises(ValueError, match="maximum context length is 64 tokens.*20 prompt tokens.*45 completion"):
        llm.generate([prompt], SamplingParams(max_tokens=45), use_tqdm=False)
    out = llm.generate([prompt], SamplingParams(max_tokens=44, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 44  # exactly the context
    rest = llm.generate([prompt], SamplingParams(max_tokens=None, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(rest.token_ids) == 44  # max_tokens=None: the rest of the context, as before
