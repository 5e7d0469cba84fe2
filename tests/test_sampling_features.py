"""Logprobs, prompt logprobs, penalties, logit bias and min_tokens against their references:
transformers' float32 log-softmax and repetition penalty, and OpenAI's presence/frequency
definition written out here."""
import pytest
import torch

from checkpoints import _key, _load, hf_greedy

from tandem import LLM, SamplingParams

VOCAB = 448


@pytest.fixture(scope="module")
def path(checkpoint_dir):
    return checkpoint_dir("llama")


@pytest.fixture(scope="module")
def llm(path):
    return LLM(str(path), dtype="float32", device="cpu", max_num_batched_tokens=16, kv_cache_tokens=512,
               block_size=8, max_model_len=128)


def _prompts(seed, lengths=(5, 17, 30)):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def _hf_logprobs(path, ids):
    """transformers' float32 log-softmax of the logits at every position of ``ids``."""
    model = _load(_key(path), torch.float32, "cpu")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return logits.float().log_softmax(-1)


def test_logprobs_and_prompt_logprobs_match_transformers(llm, path):
    for prompt in _prompts(0):
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=5,
                                                    prompt_logprobs=3), use_tqdm=False)[0]
        tokens = out.outputs[0].token_ids
        ref = _hf_logprobs(path, prompt + tokens)
        for i, (token, entry) in enumerate(zip(tokens, out.outputs[0].logprobs)):
            row = ref[len(prompt) - 1 + i]
            assert abs(entry[token].logprob - row[token].item()) < 1e-4
            assert entry[token].rank == 1  # greedy: the sampled token is the most likely
            top = row.topk(5)
            assert [t for t in entry if t != token][:4] == [t for t in top.indices.tolist() if t != token][:4]
            for t in top.indices.tolist():
                assert abs(entry[t].logprob - row[t].item()) < 1e-4
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        for p in range(1, len(prompt)):
            entry, row = out.prompt_logprobs[p], ref[p - 1]
            assert abs(entry[prompt[p]].logprob - row[prompt[p]].item()) < 1e-4
            assert entry[prompt[p]].rank == int((row > row[prompt[p]]).sum()) + 1
            assert len(entry) <= 4


def test_repetition_penalty_matches_transformers_greedy(llm, path):
    model = _load(_key(path), torch.float32, "cpu")
    for prompt in _prompts(1):
        with torch.no_grad():
            ids = torch.tensor([prompt])
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                                 repetition_penalty=1.5, eos_token_id=None, pad_token_id=2)[0, len(prompt):].tolist()
        ours = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                     repetition_penalty=1.5), use_tqdm=False)[0].outputs[0].token_ids
        assert ours == ref
    plain = llm.generate([_prompts(1)[2]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0].token_ids
    assert plain != ours  # the penalty changed something, so the comparison meant something


def _openai_penalised_greedy(path, prompt, n, presence, frequency):
    """Greedy decoding with OpenAI's definition: logit -= presence * [count > 0] + frequency * count,
    counts over the tokens generated so far."""
    model = _load(_key(path), torch.float32, "cpu")
    out = []
    for _ in range(n):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + out])).logits[0, -1].double()
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).double()
        out.append(int((logits - presence * (counts > 0) - frequency * counts).argmax()))
    return out


@pytest.mark.parametrize("presence, frequency", [(1.5, 0.0), (0.0, 0.7), (0.4, 0.9), (-0.8, 0.0)])
def test_presence_and_frequency_penalties_follow_openai(llm, path, presence, frequency):
    prompt = _prompts(2, (12,))[0]
    ours = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                 presence_penalty=presence, frequency_penalty=frequency),
                        use_tqdm=False)[0].outputs[0].token_ids
    assert ours == _openai_penalised_greedy(path, prompt, 16, presence, frequency)


def test_logit_bias_and_min_tokens(llm, path):
    prompt = _prompts(3, (9,))[0]
    forced = llm.generate([prompt], SamplingParams(temperature=0.9, seed=4, max_tokens=6, ignore_eos=True,
                                                   logit_bias={123: 100.0}), use_tqdm=False)[0].outputs[0]
    assert forced.token_ids == [123] * 6
    eos = 1
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, min_tokens=7, logit_bias={eos: 100.0}),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 8 and out.token_ids[-1] == eos and eos not in out.token_ids[:7]
    assert out.finish_reason == "stop"
    unbanned = hf_greedy(path, prompt, 3)  # the ban lifts: without min_tokens EOS comes first
    assert llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, logit_bias={eos: 100.0}),
                        use_tqdm=False)[0].outputs[0].token_ids == [eos] != unbanned[:1]


@pytest.mark.parametrize("bad", [dict(logprobs=21), dict(prompt_logprobs=-1), dict(logit_bias={-1: 1.0}),
                                 dict(logit_bias={3: 101.0}), dict(presence_penalty=3.0),
                                 dict(repetition_penalty=0.0), dict(min_tokens=5, max_tokens=3)])
def test_sampling_surface_validation(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_logit_bias_ids_are_checked_against_the_vocabulary(llm):
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate([[5, 6]], SamplingParams(logit_bias={VOCAB: 1.0}), use_tqdm=False)


def test_n_samples_are_reproducible_and_differ(llm):
    prompt = _prompts(5, (11,))[0]
    params = SamplingParams(n=3, temperature=1.0, seed=17, max_tokens=10, ignore_eos=True, logprobs=1)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    samples = [c.token_ids for c in out.outputs]
    assert [c.index for c in out.outputs] == [0, 1, 2] and len({tuple(s) for s in samples}) == 3
    assert all(len(c.logprobs) == 10 for c in out.outputs)
    again = llm.generate([prompt], params, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == samples
    one = llm.generate([prompt], SamplingParams(temperature=1.0, seed=18, max_tokens=10, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0].token_ids
    assert one == samples[1]  # child i draws with seed + i
