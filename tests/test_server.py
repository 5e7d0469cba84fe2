"""The OpenAI-compatible server, end to end: a real ``tandem serve`` (uvicorn) process on 127.0.0.1
serving the tiny llama checkpoint, driven by the ``openai`` client (sync and async) and by raw HTTP.

Seeded sampling gives the same tokens whatever else is in the batch, so the server's outputs are
compared with the offline ``LLM`` on the same checkpoint, and streamed text with non-streamed text."""
from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from server_utils import SERVER_KEY
from tandem import LLM, SamplingParams

PROMPT = "Once upon a time there was"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello, how are you?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=SERVER_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def hf_tok(checkpoint_dir):
    return AutoTokenizer.from_pretrained(str(checkpoint_dir("llama")))


@pytest.fixture(scope="module")
def offline(checkpoint_dir):
    return LLM(str(checkpoint_dir("llama")), device="cpu", max_model_len=512, kv_cache_tokens=4096)


def _offline_text(llm, prompt, **params) -> str:
    return llm.generate([prompt], SamplingParams(**params), use_tqdm=False)[0].outputs[0].text


def _complete(client, **kw):
    """A completion (EOS ignored unless said otherwise: every request runs its max_tokens)."""
    kw.setdefault("model", "tiny")
    kw["extra_body"] = {"ignore_eos": True, **kw.get("extra_body", {})}
    return client.completions.create(**kw)


def _chat(client, **kw):
    kw.setdefault("model", "tiny")
    kw.setdefault("messages", MESSAGES)
    kw["extra_body"] = {"ignore_eos": True, **kw.get("extra_body", {})}
    return client.chat.completions.create(**kw)


def _collect_stream(chunks, kind):
    """(texts by choice index, finish reasons by index, usage chunk or None, first delta per index)."""
    texts, reasons, firsts, usage = {}, {}, {}, None
    for ch in chunks:
        if ch.usage is not None:
            assert ch.choices == []
            usage = ch.usage
        for c in ch.choices:
            piece = c.text if kind == "completion" else (c.delta.content or "")
            firsts.setdefault(c.index, c if kind == "completion" else c.delta)
            texts[c.index] = texts.get(c.index, "") + piece
            if c.finish_reason is not None:
                reasons[c.index] = c.finish_reason
    return texts, reasons, usage, firsts


# --- completions and chat ---------------------------------------------------------------------------
def test_completion_matches_offline_with_exact_usage(client, hf_tok, offline):
    r = _complete(client, prompt=PROMPT, max_tokens=20, temperature=0)
    assert r.object == "text_completion" and r.model == "tiny" and r.id.startswith("cmpl-")
    (choice,) = r.choices
    assert choice.index == 0 and choice.finish_reason == "length"
    assert choice.text == _offline_text(offline, PROMPT, temperature=0, max_tokens=20, ignore_eos=True)
    prompt_tokens = len(hf_tok.encode(PROMPT))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt_tokens, 20,
                                                                                         prompt_tokens + 20)


def test_chat_completion_uses_the_chat_template(client, hf_tok):
    r = _chat(client, max_completion_tokens=12, temperature=0.7, seed=3)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    ids = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 12
    legacy = _chat(client, max_tokens=12, temperature=0.7, seed=3)  # the older field works the same
    assert legacy.choices[0].message.content == choice.message.content


def test_a_stop_token_ends_with_finish_reason_stop(client):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0,
                                       extra_body={"stop_token_ids": list(range(448))})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1


def test_null_fields_take_their_defaults(server):
    """LangChain and others send null for what they leave unset."""
    nulls = dict.fromkeys(["temperature", "top_p", "n", "stream", "stream_options", "stop", "seed", "logprobs",
                           "presence_penalty", "frequency_penalty", "logit_bias", "user", "tools"])
    headers = {"Authorization": f"Bearer {SERVER_KEY}"}
    chat = httpx.post(server.url + "/v1/chat/completions", headers=headers, timeout=30,
                      json={"model": "tiny", "messages": MESSAGES, "max_tokens": 4, **nulls})
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["completion_tokens"] <= 4
    done = httpx.post(server.url + "/v1/completions", headers=headers, timeout=30,
                      json={"model": "tiny", "prompt": [5] * 500, "max_tokens": None, "ignore_eos": True,
                            **{k: v for k, v in nulls.items() if k != "tools"}})
    assert done.status_code == 200, done.text
    assert done.json()["usage"]["completion_tokens"] == 12  # null max_tokens: up to the context (512)


@pytest.mark.parametrize("kind", ["completion", "chat"])
@pytest.mark.parametrize("stop", [None, "e"])
def test_streamed_text_equals_non_streamed(client, kind, stop):
    create = _complete if kind == "completion" else _chat
    args = dict(max_tokens=40, temperature=0.9, seed=11, stop=stop)
    if kind == "completion":
        args["prompt"] = PROMPT
    whole = create(client, **args)
    chunks = list(create(client, stream=True, stream_options={"include_usage": True}, **args))
    texts, reasons, usage, firsts = _collect_stream(chunks, kind)
    text = whole.choices[0].text if kind == "completion" else whole.choices[0].message.content
    assert texts == {0: text} and reasons == {0: whole.choices[0].finish_reason}
    assert usage == whole.usage
    if kind == "chat":
        assert firsts[0].role == "assistant"  # the role comes first
    if stop:
        assert stop not in text


def test_usage_is_streamed_only_when_asked(client):
    chunks = list(_complete(client, prompt=PROMPT, max_tokens=5, stream=True))
    assert chunks and all(ch.usage is None for ch in chunks)


def test_n_samples_count_the_prompt_once(client, hf_tok):
    r = _complete(client, prompt=PROMPT, n=2, max_tokens=16, temperature=1.0, seed=21)
    assert sorted(c.index for c in r.choices) == [0, 1]
    prompt_tokens = len(hf_tok.encode(PROMPT))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_tokens, 32)
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    assert texts[0] != texts[1]
    for i, text in enumerate(texts):  # choice i samples with seed + i
        assert _complete(client, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=21 + i).choices[0].text == text
    streamed, reasons, usage, _ = _collect_stream(
        _complete(client, prompt=PROMPT, n=2, max_tokens=16, temperature=1.0, seed=21, stream=True,
                  stream_options={"include_usage": True}), "completion")
    assert streamed == {0: texts[0], 1: texts[1]} and reasons == {0: "length", 1: "length"} and usage == r.usage
    chat = _chat(client, n=2, max_tokens=6, temperature=1.0, seed=4)
    assert len(chat.choices) == 2 and chat.usage.completion_tokens == 12


def test_stop_strings_and_stop_token_ids(client, offline):
    full = _offline_text(offline, PROMPT, temperature=0, max_tokens=40, ignore_eos=True)
    at = next(i for i in range(4, len(full) - 2) if full[i:i + 2].isalnum())
    stop = full[at:at + 2]
    cut = full[:full.index(stop)]
    r = _complete(client, prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop, "never-there"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    texts, reasons, _, _ = _collect_stream(_complete(client, prompt=PROMPT, max_tokens=40, temperature=0,
                                                     stop=stop, stream=True), "completion")
    assert texts == {0: cut} and reasons == {0: "stop"}
    kept = _complete(client, prompt=PROMPT, max_tokens=40, temperature=0, stop=stop,
                     extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == cut + stop
    ids = offline.generate([PROMPT], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0].token_ids
    r = _complete(client, prompt=PROMPT, max_tokens=40, temperature=0, extra_body={"stop_token_ids": [ids[6]]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == ids.index(ids[6]) + 1


def test_token_id_and_batched_prompts(client, offline):
    r = _complete(client, prompt=[5, 6, 7, 8], max_tokens=8, temperature=0)
    assert r.usage.prompt_tokens == 4
    assert r.choices[0].text == _offline_text(offline, [5, 6, 7, 8], temperature=0, max_tokens=8, ignore_eos=True)
    r = _complete(client, prompt=[[5, 6, 7], [9, 10]], max_tokens=4, temperature=0)
    assert [c.index for c in r.choices] == [0, 1] and r.usage.prompt_tokens == 5
    for choice, ids in zip(r.choices, [[5, 6, 7], [9, 10]]):
        assert choice.text == _offline_text(offline, ids, temperature=0, max_tokens=4, ignore_eos=True)
    r = _complete(client, prompt=["Hello", "The cat"], max_tokens=3, n=2, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3] and r.usage.completion_tokens == 12


# --- concurrency and disconnects -------------------------------------------------------------------
def test_sixteen_concurrent_streams(server, client):
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=SERVER_KEY, max_retries=0, timeout=60)
    jobs = [dict(prompt=f"Story number {i}:", max_tokens=20 + 3 * i, temperature=0.8, seed=100 + i)
            for i in range(16)]

    async def one(job):
        stream = await aclient.completions.create(model="tiny", stream=True, stream_options={"include_usage": True},
                                                  extra_body={"ignore_eos": True}, **job)
        return _collect_stream([ch async for ch in stream], "completion")

    async def run_all():
        return await asyncio.wait_for(asyncio.gather(*(one(j) for j in jobs)), 60)

    results = asyncio.run(run_all())
    for job, (texts, reasons, usage, _) in zip(jobs, results):
        assert reasons == {0: "length"} and usage.completion_tokens == job["max_tokens"]
        assert texts[0] == _complete(client, **job).choices[0].text  # alone: the same tokens


def _settled(url):
    from server_utils import metric

    return metric(url, "tandem:num_requests_running") == 0 and metric(url, "tandem:kv_cache_usage_perc") == 0


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_is_aborted(server, stream):
    from server_utils import metric, wait_until

    generated = metric(server.url, "tandem:generation_tokens_total")
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 480, "ignore_eos": True, "stream": stream}
    headers = {"Authorization": f"Bearer {SERVER_KEY}"}
    if stream:
        with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=headers, timeout=30) as resp:
            lines = resp.iter_lines()
            data = [line for line, _ in zip((x for x in lines if x.startswith("data:")), range(3))]
            assert len(data) == 3
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=0.5)
    assert wait_until(lambda: metric(server.url, "tandem:num_requests_running") == 0, 5)
    assert wait_until(lambda: _settled(server.url), 5)
    assert metric(server.url, "tandem:generation_tokens_total") - generated < 400  # not run to its 480 tokens


def test_429_beyond_max_num_waiting(server):
    """16 run and 8 wait (the server's limits); the 25th is refused, and the others are unaffected."""
    from server_utils import wait_until

    headers = {"Authorization": f"Bearer {SERVER_KEY}"}
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 480, "ignore_eos": True, "stream": True}

    async def run():
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=30) as http:
            streams = [http.stream("POST", "/v1/completions", json=body) for _ in range(24)]
            responses = [await s.__aenter__() for s in streams]
            assert [r.status_code for r in responses] == [200] * 24
            refused = await http.post("/v1/completions", json={**body, "stream": False})
            for s in streams:
                await s.__aexit__(None, None, None)
            return refused

    refused = asyncio.run(asyncio.wait_for(run(), 60))
    assert refused.status_code == 429
    _assert_error_shape(refused.json(), "too_many_requests")
    assert "--max-num-waiting 8" in refused.json()["error"]["message"]
    assert wait_until(lambda: _settled(server.url), 10)


def test_bad_requests_do_not_disturb_a_running_one(server, client):
    job = dict(prompt=PROMPT, max_tokens=60, temperature=0.8, seed=77)
    expected = _complete(client, **job).choices[0].text
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=SERVER_KEY, max_retries=0, timeout=60)
    bad_bodies = [{"prompt": PROMPT, "temperature": -1}, {"prompt": [10**6]}, {"prompt": PROMPT, "max_tokens": 9999},
                  {"prompt": PROMPT, "top_p": 0}, {"model": "other", "prompt": "x"}, {"prompt": PROMPT, "n": 0}]

    async def run():
        stream = await aclient.completions.create(model="tiny", stream=True, extra_body={"ignore_eos": True}, **job)
        text, statuses = "", []
        async with httpx.AsyncClient(base_url=server.url, timeout=30,
                                     headers={"Authorization": f"Bearer {SERVER_KEY}"}) as http:
            async for ch in stream:
                text += ch.choices[0].text
                if len(statuses) < len(bad_bodies):
                    resp = await http.post("/v1/completions", json={"model": "tiny", **bad_bodies[len(statuses)]})
                    statuses.append(resp.status_code)
        return text, statuses

    text, statuses = asyncio.run(asyncio.wait_for(run(), 60))
    assert text == expected and statuses == [400, 400, 400, 400, 404, 400]


# --- errors ------------------------------------------------------------------------------------------
def _assert_error_shape(body, code=None):
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    message = body["error"]["message"]
    assert "Traceback" not in message and ".py" not in message
    if code is not None:
        assert body["error"]["code"] == code


@pytest.mark.parametrize("body, param", [
    ('{"model": "tiny", "prompt": ', None),  # malformed JSON
    ("[1, 2]", None),  # not an object
    ({"model": "tiny"}, "prompt"),
    ({"model": "tiny", "prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "temperature": -1}, "temperature"),
    ({"model": "tiny", "prompt": "x", "top_p": 1.5}, "top_p"),
    ({"model": "tiny", "prompt": "x", "top_k": -5}, "top_k"),
    ({"model": "tiny", "prompt": "x", "min_p": 2}, "min_p"),
    ({"model": "tiny", "prompt": "x", "n": 0}, "n"),
    ({"model": "tiny", "prompt": "x", "stop": 5}, "stop"),
    ({"model": "tiny", "prompt": "x", "seed": 2**70}, "seed"),
    ({"model": "tiny", "prompt": []}, "prompt"),
    ({"model": "tiny", "prompt": ""}, "prompt"),
    ({"model": "tiny", "prompt": [1, 100000]}, "prompt"),
    ({"model": "tiny", "prompt": [1.5, 2]}, "prompt"),
    ({"model": "tiny", "prompt": "x", "best_of": 2}, "best_of"),
    ({"model": "tiny", "prompt": "x", "logprobs": 21}, "logprobs"),  # the cap is 20
    ({"model": "tiny", "prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
    ({"model": "tiny", "prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"model": "tiny", "prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"model": "tiny", "prompt": "x", "logit_bias": {"100000": 1}}, "logit_bias"),
    ({"model": "tiny", "prompt": "x", "min_tokens": 9, "max_tokens": 2}, "min_tokens"),
    ({"model": "tiny", "prompt": "x", "stream_options": {"include_usage": "maybe"}}, "stream_options"),
])
def test_invalid_completion_requests_get_400(server, body, param):
    headers = {"Authorization": f"Bearer {SERVER_KEY}", "Content-Type": "application/json"}
    kw = {"content": body} if isinstance(body, str) else {"json": body}
    resp = httpx.post(server.url + "/v1/completions", headers=headers, timeout=30, **kw)
    assert resp.status_code == 400, resp.text
    _assert_error_shape(resp.json())
    assert resp.json()["error"]["type"] == "invalid_request_error" and resp.json()["error"]["param"] == param


@pytest.mark.parametrize("body, param", [
    ({"model": "tiny", "messages": []}, "messages"),
    ({"model": "tiny", "messages": [{"role": "user"}], "max_completion_tokens": -1}, "max_completion_tokens"),
    ({"model": "tiny", "messages": [{"content": "hi"}]}, "messages"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
     "messages"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
])
def test_invalid_chat_requests_get_400(server, body, param):
    resp = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {SERVER_KEY}"})
    assert resp.status_code == 400, resp.text
    _assert_error_shape(resp.json())
    assert resp.json()["error"]["param"] == param


def test_the_context_limit_is_named(server, client):
    with pytest.raises(openai.BadRequestError) as err:
        _complete(client, prompt=PROMPT, max_tokens=600)
    assert err.value.status_code == 400 and "maximum context length is 512 tokens" in err.value.message
    _assert_error_shape(err.value.response.json(), "context_length_exceeded")
    assert err.value.response.json()["error"]["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as err:
        _complete(client, prompt=[5] * 520, max_tokens=1)
    assert "520 prompt tokens" in err.value.message and err.value.response.json()["error"]["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as err:  # the same, counted after the chat template
        _chat(client, messages=[{"role": "user", "content": "the cat " * 400}])
    assert "maximum context length is 512" in err.value.message
    assert err.value.response.json()["error"]["param"] == "messages"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt="x")
    _assert_error_shape(err.value.response.json(), "model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)


def test_the_api_key_is_required_on_v1(server):
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.models.list()
    _assert_error_shape(err.value.response.json(), "invalid_api_key")
    for path in ("/v1/completions", "/v1/chat/completions"):  # no key at all
        resp = httpx.post(server.url + path, json={"prompt": "x"})
        assert resp.status_code == 401
        _assert_error_shape(resp.json(), "invalid_api_key")
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key


def test_unknown_routes_and_methods_answer_in_the_error_shape(server):
    for resp, status in ((httpx.get(server.url + "/nothing"), 404),
                         (httpx.get(server.url + "/v1/completions", headers={"Authorization": f"Bearer {SERVER_KEY}"}),
                          405)):
        assert resp.status_code == status
        _assert_error_shape(resp.json())


# --- the other endpoints -----------------------------------------------------------------------------
def test_models_health_version(server, client):
    (model,) = client.models.list().data
    assert model.id == "tiny" and model.owned_by == "tandem" and model.max_model_len == 512
    assert httpx.get(server.url + "/health").status_code == 200
    import tandem

    assert httpx.get(server.url + "/version").json() == {"version": tandem.__version__}


def test_tokenize_detokenize_tokenizer_info(server, hf_tok):
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == hf_tok.eos_token and info["chat_template"] == hf_tok.chat_template
    tok = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}).json()
    assert tok["tokens"] == hf_tok.encode(PROMPT, add_special_tokens=False)
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 512
    eos = httpx.post(server.url + "/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False})
    assert eos.json()["tokens"] == [hf_tok.eos_token_id]
    chat = httpx.post(server.url + "/tokenize", json={"messages": MESSAGES}).json()
    assert chat["count"] > tok["count"]
    text = httpx.post(server.url + "/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"]
    assert text == PROMPT
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [10**7]})
    assert bad.status_code == 400
    _assert_error_shape(bad.json())


def test_metrics_export_vllm_names_and_the_gpu_idle_fraction(server, client):
    _complete(client, prompt=PROMPT, max_tokens=8)
    text = httpx.get(server.url + "/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "gpu_idle_fraction",
                 "prompt_tokens_total", "generation_tokens_total", "num_preemptions_total",
                 "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                 "e2e_request_latency_seconds_bucket", "request_queue_time_seconds_count",
                 "request_success_total", "gpu_busy_seconds_total", "gpu_idle_seconds_total"):
        assert f"tandem:{name}{{" in text, name
    from server_utils import metric

    assert 0.0 <= metric(server.url, "tandem:gpu_idle_fraction") <= 1.0
    assert metric(server.url, "tandem:gpu_busy_seconds_total") > 0
    assert metric(server.url, "tandem:gpu_idle_seconds_total") >= 0
    assert metric(server.url, "tandem:time_to_first_token_seconds_count") >= 1
