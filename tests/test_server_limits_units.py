"""The pieces behind the server's limits, without a server: the per-request limits and the default
max_tokens, the bounded worker pool, the tokenizer calls made off the loop (the same ids as the
engine's), and the CLI's checks of the new flags."""
from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest

from tandem.cli import main
from tandem.sampling_params import SamplingParams
from tandem.server.defaults import default_max_num_waiting
from tandem.server.errors import APIError
from tandem.server.offload import Offload
from tandem.server.request_limits import RequestLimits
from tandem.server.serving import Prompt, Serving
from tandem.server.tokenizing import chat_ids, encode_text
from tandem.tokenizer import ByteTokenizer, HFTokenizer


# --- per-request limits ----------------------------------------------------------------------------
@pytest.mark.parametrize("prompts, n, capacity, param, flag", [
    (5, 1, None, "prompt", "--max-prompts-per-request"),
    (1, 3, None, "n", "--max-n"),
    (2, 2, None, "n", "--max-seqs-per-request"),
    (3, 1, None, "prompt", "--max-seqs-per-request"),
    (1, 2, 1, "n", "--max-num-waiting"),
])
def test_request_limits_name_the_field_and_flag(prompts, n, capacity, param, flag):
    limits = RequestLimits(max_prompts=4, max_n=2, max_seqs=2)
    with pytest.raises(APIError) as caught:
        limits.sequences(prompts, n, capacity)
    assert caught.value.status == 400 and caught.value.param == param and flag in caught.value.message


def test_request_limits_count_sequences_within_them():
    assert RequestLimits(max_prompts=4, max_n=2, max_seqs=8).sequences(4, 2, capacity=8) == 8


@pytest.mark.parametrize("kwargs, flag", [({"max_prompts": 0}, "--max-prompts-per-request"),
                                          ({"max_n": 1025}, "--max-n"), ({"max_seqs": -1}, "--max-seqs-per-request"),
                                          ({"default_max_tokens": 0}, "--default-max-tokens")])
def test_request_limits_refuse_bad_values(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        RequestLimits(**kwargs)


def test_the_default_max_num_waiting_scales_with_the_batch():
    assert default_max_num_waiting(4) == 1024 and default_max_num_waiting(512) == 2048


def _serving(default_max_tokens: int | None) -> Serving:
    client = SimpleNamespace(max_model_len=100)
    return Serving(client, ["m"], RequestLimits(default_max_tokens=default_max_tokens))  # type: ignore[arg-type]


@pytest.mark.parametrize("cap, prompt_len, requested, expected", [
    (None, 30, None, None),  # the engine gives the rest of the context (70) itself
    (10, 30, None, 10),  # capped by --default-max-tokens
    (10, 95, None, 5),  # the rest of the context is less than the cap
    (10, 30, 50, 50),  # a request's own max_tokens wins
])
def test_the_default_max_tokens(cap, prompt_len, requested, expected):
    params = _serving(cap).prompt_params(Prompt(None, [1] * prompt_len), SamplingParams(max_tokens=requested))
    assert params.max_tokens == expected


def test_a_default_max_tokens_below_min_tokens_is_a_400():
    with pytest.raises(APIError) as caught:
        _serving(5).prompt_params(Prompt(None, [1] * 10), SamplingParams(max_tokens=None, min_tokens=8))
    assert caught.value.status == 400 and caught.value.param == "min_tokens"


# --- the worker pool -------------------------------------------------------------------------------
def test_offload_runs_small_work_inline_and_large_work_on_a_thread():
    offload = Offload(threads=2, inline_size=10, max_pending_size=100)

    async def go() -> tuple[int, int, int]:
        return (threading.get_ident(), await offload.run(threading.get_ident, size=10),
                await offload.run(threading.get_ident, size=11))

    try:
        loop_thread, small, large = asyncio.run(go())
    finally:
        offload.close()
    assert small == loop_thread != large and offload.pending == 0


def test_offload_refuses_large_work_beyond_its_budget_with_429_and_frees_it_when_done():
    offload = Offload(threads=2, inline_size=10, max_pending_size=100)
    gate = threading.Event()

    async def go() -> tuple[int, int, int]:
        first = asyncio.ensure_future(offload.run(gate.wait, size=60))
        await asyncio.sleep(0.05)
        with pytest.raises(APIError) as refused:  # 60 + 50 > 100
            await offload.run(gate.wait, size=50)
        second = asyncio.ensure_future(offload.run(gate.wait, size=11))  # 60 + 11 fits
        await asyncio.sleep(0.05)
        taken = offload.pending
        gate.set()
        await asyncio.gather(first, second)
        return refused.value.status, taken, offload.pending

    try:
        assert asyncio.run(go()) == (429, 71, 0)
    finally:
        gate.set()
        offload.close()


def test_an_exception_on_a_thread_reaches_the_caller():
    offload = Offload(inline_size=0)

    def fail() -> None:
        raise APIError(400, "bad", "prompt")

    try:
        with pytest.raises(APIError, match="bad"):
            asyncio.run(offload.run(fail, size=1))
    finally:
        offload.close()
    assert offload.pending == 0


# --- tokenizing off the loop: the engine's ids --------------------------------------------------------
TEXTS = ["Hello world", "<s> special <|im_end|> tokens", "ünïcode  \n\t spaces   ", "a" * 5000, "x"]


@pytest.fixture(scope="module")
def hf_tokenizer(checkpoint_dir):
    return HFTokenizer(checkpoint_dir("llama"))


def test_encode_text_gives_the_engines_ids(hf_tokenizer):
    for text in TEXTS:
        assert encode_text(hf_tokenizer, text) == hf_tokenizer.encode(text)
        assert encode_text(hf_tokenizer, text, False) == list(hf_tokenizer._tok.encode(text, add_special_tokens=False))
    assert encode_text(ByteTokenizer(), "hé") == ByteTokenizer().encode("hé")


def test_chat_ids_give_the_engines_ids(hf_tokenizer):
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi <s> there"}]
    assert chat_ids(hf_tokenizer, messages) == hf_tokenizer.apply_chat_template(messages)
    assert chat_ids(ByteTokenizer(), messages) == ByteTokenizer().apply_chat_template(messages)


def test_a_backend_transformers_would_reconfigure_goes_through_transformers(checkpoint_dir):
    tokenizer = HFTokenizer(checkpoint_dir("llama"))
    tokenizer._tok._tokenizer.enable_truncation(3)  # transformers turns this off before encoding
    text = "a longer text than three tokens, surely"
    assert len(encode_text(tokenizer, text)) > 3
    assert encode_text(tokenizer, text) == HFTokenizer(checkpoint_dir("llama")).encode(text)


# --- the CLI -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, flag", [
    (["--max-n", "0"], "--max-n"), (["--max-n", "2000"], "--max-n"),
    (["--max-prompts-per-request", "0"], "--max-prompts-per-request"),
    (["--max-seqs-per-request", "0"], "--max-seqs-per-request"),
    (["--default-max-tokens", "0"], "--default-max-tokens"),
    (["--max-header-bytes", "10"], "--max-header-bytes"), (["--request-read-timeout", "0"], "--request-read-timeout"),
])
def test_cli_refuses_bad_limits(capsys, args, flag):
    assert main(["serve", "--model", "random:tiny", *args]) == 2
    assert flag in capsys.readouterr().err
