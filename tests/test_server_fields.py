"""The request fields of issue 23 (point 5) through a real ``tandem serve``, with the ``openai``
client (vLLM's extras go in ``extra_body``): each changes the response as vLLM's server does, checked
against the offline ``LLM`` or the checkpoint's own tokenizer, plain and streamed."""
from __future__ import annotations

import math

import httpx
import openai
import pytest

from checkpoints import BOS_ID, EOS_ID, make_tokenizer
from server_utils import SERVER_KEY, ServerProcess
from test_server import MESSAGES, PROMPT, _chat, _complete, client, hf_tok, offline  # noqa: F401 - fixtures
from tandem import SamplingParams
from tandem.server.tokenizing import chat_prompt, encode_text
from tandem.tokenizer import ChatOptions, HFTokenizer

AUTH = {"Authorization": f"Bearer {SERVER_KEY}"}


def _extra(obj, name):
    return (obj.model_extra or {}).get(name)


def _reference(offline, prompt, **params):
    return offline.generate([prompt], SamplingParams(ignore_eos=True, **params), use_tqdm=False)[0]


def test_top_k_top_p_min_p_min_tokens_match_offline(client, offline):
    for params in (dict(top_k=5), dict(top_p=0.5), dict(min_p=0.2)):
        r = _complete(client, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=9,
                      top_p=params.get("top_p"), extra_body={k: v for k, v in params.items() if k != "top_p"})
        ref = _reference(offline, PROMPT, max_tokens=12, temperature=1.0, seed=9, **params).outputs[0]
        assert r.choices[0].text == ref.text
    # min_tokens: the stop token (every id here) is banned until the fourth token
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0,
                                  extra_body={"min_tokens": 4, "stop_token_ids": list(range(448))})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "stop"


def test_stop_reason_names_the_stop_string_or_token(client, offline):
    ids = _reference(offline, PROMPT, temperature=0, max_tokens=20).outputs[0].token_ids
    r = _complete(client, prompt=PROMPT, max_tokens=20, temperature=0, extra_body={"stop_token_ids": [ids[3]]})
    assert r.choices[0].finish_reason == "stop" and _extra(r.choices[0], "stop_reason") == ids[3]
    full = _complete(client, prompt=PROMPT, max_tokens=20, temperature=0).choices[0]
    assert full.finish_reason == "length" and _extra(full, "stop_reason") is None
    stop = full.text[5:7]
    r = _complete(client, prompt=PROMPT, max_tokens=20, temperature=0, stop=["never", stop])
    assert _extra(r.choices[0], "stop_reason") == stop and not r.choices[0].text.endswith(stop)
    chat = _chat(client, max_tokens=5, temperature=0, extra_body={"stop_token_ids": list(range(448))})
    assert chat.choices[0].finish_reason == "stop" and _extra(chat.choices[0], "stop_reason") is not None


def test_return_token_ids_and_stop_reason_streamed_and_whole(client, offline):
    kw = dict(prompt=PROMPT, max_tokens=10, temperature=0.8, seed=4, extra_body={"return_token_ids": True})
    whole = _complete(client, **kw).choices[0]
    ref = _reference(offline, PROMPT, max_tokens=10, temperature=0.8, seed=4)
    assert _extra(whole, "token_ids") == ref.outputs[0].token_ids
    assert _extra(whole, "prompt_token_ids") == ref.prompt_token_ids
    ids, prompt_ids, stop_reasons = [], None, []
    for ch in _complete(client, stream=True, **kw):
        for c in ch.choices:
            ids += _extra(c, "token_ids") or []
            prompt_ids = prompt_ids or _extra(c, "prompt_token_ids")
            if c.finish_reason is not None:
                stop_reasons.append(_extra(c, "stop_reason"))
    assert ids == ref.outputs[0].token_ids and prompt_ids == ref.prompt_token_ids and stop_reasons == [None]
    chat = _chat(client, max_tokens=4, temperature=0, extra_body={"return_token_ids": True})
    assert len(_extra(chat.choices[0], "token_ids")) == 4 and len(_extra(chat, "prompt_token_ids")) == \
        chat.usage.prompt_tokens


def test_echo_with_max_tokens_zero_scores_the_prompt(client, offline):
    ids = [17, 42, 99, 5, 230, 31, 8]
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=2)
    (choice,) = r.choices
    ref = _reference(offline, ids, max_tokens=1, prompt_logprobs=2)
    assert choice.text == offline.tokenizer.decode(ids) and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    lp = choice.logprobs.token_logprobs
    assert len(lp) == len(ids) and lp[0] is None
    assert all(math.isclose(lp[p], ref.prompt_logprobs[p][ids[p]].logprob, abs_tol=1e-4) for p in range(1, len(ids)))
    streamed = list(client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=2,
                                              stream=True))
    text = "".join(c.text for ch in streamed for c in ch.choices)
    tokens = [t for ch in streamed for c in ch.choices if c.logprobs for t in c.logprobs.token_logprobs]
    assert text == choice.text and tokens == lp
    with pytest.raises(openai.BadRequestError) as err:  # without echo there is nothing to return
        client.completions.create(model="tiny", prompt=ids, max_tokens=0)
    assert err.value.response.json()["error"]["param"] == "max_tokens"


def test_prompt_logprobs_match_offline(client, offline, hf_tok):
    r = _complete(client, prompt=PROMPT, max_tokens=2, temperature=0, extra_body={"prompt_logprobs": 3})
    ref = _reference(offline, PROMPT, max_tokens=2, temperature=0, prompt_logprobs=3)
    got = _extra(r.choices[0], "prompt_logprobs")
    assert len(got) == len(ref.prompt_token_ids) and got[0] is None
    for p in range(1, len(got)):
        token = ref.prompt_token_ids[p]
        assert math.isclose(got[p][str(token)]["logprob"], ref.prompt_logprobs[p][token].logprob, abs_tol=1e-4)
        assert {v["rank"] for v in got[p].values()} >= {1, 2, 3}  # the 3 most likely, and the prompt's own token
    chat = _chat(client, max_tokens=2, extra_body={"prompt_logprobs": 0})
    entries = _extra(chat, "prompt_logprobs")  # chat: one prompt, beside the choices
    assert len(entries) == chat.usage.prompt_tokens and entries[0] is None and all(len(e) == 1 for e in entries[1:])


def test_allowed_token_ids_and_bad_words(client, hf_tok):
    allowed = [hf_tok.convert_tokens_to_ids(t) for t in ("a", "Ġa", "Ġs", "in")]
    r = _complete(client, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=2, logprobs=5,
                  extra_body={"allowed_token_ids": allowed, "return_token_ids": True})
    assert set(_extra(r.choices[0], "token_ids")) <= set(allowed)
    assert all(v == -9999.0 for top in r.choices[0].logprobs.top_logprobs for t, v in top.items()
               if hf_tok.convert_tokens_to_ids(t.replace(" ", "Ġ")) not in allowed)  # -inf, written as vLLM does
    # "a" and " a" are each one token: banned although the bias favours them (and " s" comes instead)
    bias = {str(t): 50 for t in allowed[:3]}
    r = _complete(client, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=2, logit_bias=bias,
                  extra_body={"bad_words": ["a"], "return_token_ids": True})
    out = _extra(r.choices[0], "token_ids")
    assert not set(out) & set(allowed[:2]) and allowed[2] in out
    # a word of several tokens: the host bans its last token where the output ends with the rest
    word = hf_tok.encode(" ox", add_special_tokens=False)
    assert len(word) > 1
    pushed = {str(t): 15 for t in word}  # the model writes almost only these two tokens
    runs = []
    for bad in (None, ["ox"]):
        r = _complete(client, prompt=PROMPT, max_tokens=40, temperature=1.0, seed=3, logit_bias=pushed,
                      extra_body={"bad_words": bad, "return_token_ids": True})
        out = _extra(r.choices[0], "token_ids")
        runs.append(sum(out[i:i + len(word)] == word for i in range(len(out))))
    assert runs[0] > 0 and runs[1] == 0, runs


def test_truncate_prompt_tokens(client, offline, hf_tok):
    ids = hf_tok.encode(PROMPT)
    for side, kept in (("left", ids[-3:]), ("right", ids[:3])):
        r = _complete(client, prompt=PROMPT, max_tokens=4, temperature=0, echo=True,
                      extra_body={"truncate_prompt_tokens": 3, "truncation_side": side})
        ref = _reference(offline, kept, max_tokens=4, temperature=0).outputs[0].text
        assert r.usage.prompt_tokens == 3 and r.choices[0].text == hf_tok.decode(kept) + ref
    whole = _complete(client, prompt=PROMPT, max_tokens=2, extra_body={"truncate_prompt_tokens": -1})
    assert whole.usage.prompt_tokens == len(ids)


def test_return_tokens_as_token_ids(client):
    r = _complete(client, prompt=PROMPT, max_tokens=4, logprobs=2,
                  extra_body={"return_tokens_as_token_ids": True, "return_token_ids": True})
    lp = r.choices[0].logprobs
    assert lp.tokens == [f"token_id:{t}" for t in _extra(r.choices[0], "token_ids")]
    assert all(k.startswith("token_id:") for top in lp.top_logprobs for k in top)
    chat = _chat(client, max_tokens=3, logprobs=True, top_logprobs=1, extra_body={"return_tokens_as_token_ids": True})
    assert all(e.token.startswith("token_id:") for e in chat.choices[0].logprobs.content)


def test_request_id_names_the_response(client):
    assert _complete(client, prompt=PROMPT, max_tokens=1, extra_body={"request_id": "abc-1"}).id == "cmpl-abc-1"
    assert _chat(client, max_tokens=1, extra_body={"request_id": "abc-1"}).id == "chatcmpl-abc-1"


def test_continuous_usage_stats(client):
    chunks = list(_complete(client, prompt=PROMPT, max_tokens=6, stream=True,
                            stream_options={"include_usage": True, "continuous_usage_stats": True}))
    counts = [ch.usage.completion_tokens for ch in chunks if ch.choices]
    assert counts == sorted(counts) and counts[-1] == 6 and chunks[-1].usage.completion_tokens == 6
    alone = list(_complete(client, prompt=PROMPT, max_tokens=3, stream=True,  # vLLM's rule: only with include_usage
                           stream_options={"continuous_usage_stats": True}))
    assert all(ch.usage is None for ch in alone)


def test_informational_fields_are_accepted(client):
    r = _chat(client, max_tokens=2, user="u", metadata={"k": "v"}, safety_identifier="s", prompt_cache_key="p",
              service_tier="auto", modalities=["text"], extra_body={"session_id": "s1"})
    assert r.usage.completion_tokens == 2
    assert _complete(client, prompt=PROMPT, max_tokens=1, user="u",
                     extra_body={"session_id": "s1", "safety_identifier": "s"}).usage.completion_tokens == 1


def test_skip_special_tokens(client, hf_tok):
    bias = {str(EOS_ID): 100}  # the model writes EOS (ignored as a stop): its text shows only when not skipped
    shown = _complete(client, prompt=PROMPT, max_tokens=2, logit_bias=bias, extra_body={"skip_special_tokens": False})
    hidden = _complete(client, prompt=PROMPT, max_tokens=2, logit_bias=bias)
    assert shown.choices[0].text == hf_tok.eos_token * 2 and hidden.choices[0].text == ""


def _chat_ids(hf_tok, messages, **kw):
    ids = hf_tok.apply_chat_template(messages, tokenize=True, **kw)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_add_generation_prompt(client, hf_tok):
    r = _chat(client, max_tokens=1, extra_body={"add_generation_prompt": False, "return_token_ids": True})
    assert _extra(r, "prompt_token_ids") == _chat_ids(hf_tok, MESSAGES, add_generation_prompt=False)
    tok = httpx.post(client.base_url.join("/tokenize").__str__().replace("/v1", ""), timeout=30,
                     json={"messages": MESSAGES, "add_generation_prompt": False, "return_token_strs": True}).json()
    assert tok["tokens"] == _chat_ids(hf_tok, MESSAGES, add_generation_prompt=False)
    assert tok["token_strs"] == hf_tok.convert_ids_to_tokens(tok["tokens"])


def test_chat_echo_and_continue_final_message(client, hf_tok):
    messages = MESSAGES + [{"role": "assistant", "content": "I am fine and"}]
    r = _chat(client, messages=messages, max_tokens=4, temperature=0,
              extra_body={"continue_final_message": True, "echo": True, "return_prompt_text": True,
                          "return_token_ids": True})
    expected = _chat_ids(hf_tok, messages, continue_final_message=True)
    assert _extra(r, "prompt_token_ids") == expected and _extra(r, "prompt_text") == hf_tok.decode(expected)
    content = r.choices[0].message.content
    assert content.startswith("I am fine and") and content != "I am fine and"
    plain = _chat(client, messages=messages, max_tokens=4, temperature=0, extra_body={"continue_final_message": True})
    assert content == "I am fine and" + plain.choices[0].message.content
    streamed = "".join(c.delta.content or "" for ch in _chat(client, messages=messages, max_tokens=4, temperature=0,
                                                               stream=True, extra_body={"continue_final_message": True,
                                                                                        "echo": True})
                       for c in ch.choices)
    assert streamed == content
    # echo only repeats a message the response continues: after a generation prompt, nothing
    assert _chat(client, max_tokens=4, temperature=0, extra_body={"echo": True}).choices[0].message.content == \
        _chat(client, max_tokens=4, temperature=0).choices[0].message.content
    with pytest.raises(openai.BadRequestError) as err:
        _chat(client, messages=messages, extra_body={"continue_final_message": True, "add_generation_prompt": True})
    assert err.value.response.json()["error"]["param"] == "continue_final_message"


TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% for d in documents or [] %}[{{ d['title'] }}] {% endfor %}{{ greeting | default('none') }}")


@pytest.fixture(scope="module")
def trusting_server(checkpoint_dir):
    proc = ServerProcess("--model", str(checkpoint_dir("llama")), "--served-model-name", "tiny", "--max-model-len",
                         "256", "--max-num-seqs", "4", "--api-key", SERVER_KEY, "--trust-request-chat-template")
    yield proc
    assert proc.stop() == 0


def test_chat_template_kwargs_and_documents_reach_the_template(client, trusting_server, hf_tok):
    refused = httpx.post(client.base_url.join("chat/completions").__str__(), headers=AUTH, timeout=30,
                         json={"messages": MESSAGES, "chat_template": TEMPLATE})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "chat_template"
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 1, "chat_template": TEMPLATE,
            "chat_template_kwargs": {"greeting": "hello there"}, "documents": [{"title": "A", "text": "x"}],
            "return_prompt_text": True}
    r = httpx.post(trusting_server.url + "/v1/chat/completions", headers=AUTH, json=body, timeout=30).json()
    assert r["prompt_text"] == "system: You are terse.\nuser: Hello, how are you?\n[A] hello there"
    tok = httpx.post(trusting_server.url + "/tokenize", timeout=30,
                     json={k: body[k] for k in ("messages", "chat_template", "chat_template_kwargs", "documents")})
    assert tok.json()["tokens"] == hf_tok.encode(r["prompt_text"], add_special_tokens=False)
    reserved = httpx.post(trusting_server.url + "/v1/chat/completions", headers=AUTH, timeout=30,
                          json={**body, "chat_template_kwargs": {"add_generation_prompt": False}})
    assert reserved.status_code == 400 and reserved.json()["error"]["param"] == "chat_template_kwargs"


def test_add_special_tokens():
    """The flag reaches the tokenizer: the tests' tokenizer adds no special tokens itself, so one that
    adds BOS (a post-processor) shows the difference, for a text and for a rendered conversation."""
    from tokenizers import processors

    hf = make_tokenizer()
    hf.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    tok = object.__new__(HFTokenizer)
    tok._tok = hf
    assert encode_text(tok, PROMPT, True) == [BOS_ID] + encode_text(tok, PROMPT, False)
    text, with_bos = chat_prompt(tok, MESSAGES, ChatOptions(), add_special_tokens=True)
    assert with_bos == [BOS_ID] + chat_prompt(tok, MESSAGES, ChatOptions(), add_special_tokens=False)[1]
    assert text.startswith("<s>")  # the template's own BOS: the default (False) adds no second one
