"""The sampling surface through the server: logprobs (completions, with echo as lm-eval's
loglikelihood asks; chat with top_logprobs), penalties and logit bias, n with logprobs. The offline
``LLM`` on the same checkpoint is the reference (same engine, same numbers)."""
from __future__ import annotations

import math

import openai
import pytest

from server_utils import SERVER_KEY
from tandem import LLM, SamplingParams


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=SERVER_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def offline(checkpoint_dir):
    return LLM(str(checkpoint_dir("llama")), device="cpu", max_model_len=512, kv_cache_tokens=4096)


def test_echo_logprobs_of_a_token_id_prompt_as_lm_eval_asks(client, offline):
    prompt = [17, 42, 99, 5, 230, 31, 8]
    resp = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0, logprobs=1,
                                     echo=True)
    lp = resp.choices[0].logprobs
    assert len(lp.token_logprobs) == len(prompt) + 1 and lp.token_logprobs[0] is None
    ref = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1, logprobs=1),
                           use_tqdm=False)[0]
    for p in range(1, len(prompt)):
        assert math.isclose(lp.token_logprobs[p], ref.prompt_logprobs[p][prompt[p]].logprob, abs_tol=1e-4)
        assert len(lp.top_logprobs[p]) >= 1
    token = ref.outputs[0].token_ids[0]
    assert math.isclose(lp.token_logprobs[-1], ref.outputs[0].logprobs[0][token].logprob, abs_tol=1e-4)
    assert resp.usage.prompt_tokens == len(prompt) and resp.usage.completion_tokens == 1


def test_completion_logprobs_streamed_equal_non_streamed(client):
    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0.8, seed=5, logprobs=3,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].logprobs
    streamed = {"tokens": [], "token_logprobs": []}
    for ch in client.completions.create(stream=True, **kw):
        if ch.choices and ch.choices[0].logprobs is not None:
            streamed["tokens"] += ch.choices[0].logprobs.tokens
            streamed["token_logprobs"] += ch.choices[0].logprobs.token_logprobs
    assert streamed["tokens"] == full.tokens and streamed["token_logprobs"] == full.token_logprobs
    assert len(full.tokens) == 8 and all(len(t) <= 4 for t in full.top_logprobs)


def test_chat_top_logprobs(client):
    resp = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=4,
                                          extra_body={"ignore_eos": True})
    content = resp.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 4 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.bytes == list(entry.token.encode())
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], top_logprobs=2)


def test_penalties_and_logit_bias_reach_the_engine(client, offline):
    prompt = [40, 41, 42, 43, 44]
    kw = dict(temperature=0, max_tokens=12, presence_penalty=1.2, frequency_penalty=0.4, repetition_penalty=1.3)
    resp = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                     presence_penalty=1.2, frequency_penalty=0.4,
                                     extra_body={"repetition_penalty": 1.3, "ignore_eos": True})
    ref = offline.generate([prompt], SamplingParams(ignore_eos=True, **kw), use_tqdm=False)[0].outputs[0]
    assert resp.choices[0].text == ref.text
    forced = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=1.0, seed=3,
                                       logit_bias={"77": 100}, logprobs=0, extra_body={"ignore_eos": True})
    assert forced.choices[0].logprobs.tokens == [offline.tokenizer.decode([77], skip_special_tokens=False)] * 4


def test_n_choices_each_with_logprobs(client):
    resp = client.completions.create(model="tiny", prompt="The", max_tokens=6, n=2, temperature=1.0, seed=11,
                                     logprobs=2, extra_body={"ignore_eos": True})
    assert [c.index for c in resp.choices] == [0, 1]
    assert all(len(c.logprobs.tokens) == 6 for c in resp.choices)
    assert resp.choices[0].logprobs.tokens != resp.choices[1].logprobs.tokens
