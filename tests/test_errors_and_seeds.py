"""Seeded sampling is reproducible in any batch; bad inputs give clear errors and change nothing else."""
import pytest
import torch

from tandem import LLM, SamplingParams
from tandem.cli import main
from tandem.config import EngineConfig
from tandem.llm import create_engine


@pytest.fixture(scope="module")
def tiny_llm():
    return LLM("random:tiny", device="cpu", max_model_len=64, kv_cache_tokens=2048)


@pytest.fixture(scope="module")
def checkpoint(checkpoint_dir):
    return checkpoint_dir("llama")


def test_seeded_request_is_the_same_alone_and_in_a_batch(tiny_llm):
    gen = torch.Generator().manual_seed(11)
    target = torch.randint(0, 512, (9,), generator=gen).tolist()
    others = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (3, 30, 17)]
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=24, ignore_eos=True)
    alone = tiny_llm.generate([target], params, use_tqdm=False)[0].outputs[0].token_ids
    mixed = [SamplingParams(temperature=1.0, seed=i, max_tokens=10 + i, ignore_eos=True) for i in range(3)]
    batch = tiny_llm.generate(others[:2] + [target] + others[2:], mixed[:2] + [params] + mixed[2:], use_tqdm=False)
    assert batch[2].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=4321, max_tokens=24, ignore_eos=True)
    assert tiny_llm.generate([target], other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_too_long_prompt_is_rejected_and_the_engine_goes_on(tiny_llm):
    with pytest.raises(ValueError, match="max_model_len"):
        tiny_llm.generate([[1, 2, 3], list(range(100))], SamplingParams(max_tokens=4), use_tqdm=False)
    out = tiny_llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_value_the_step_cannot_carry_is_rejected_and_the_engine_goes_on(tiny_llm):
    with pytest.raises(ValueError, match="top_k must fit in a signed 64-bit"):
        tiny_llm.generate([[1, 2, 3], [4, 5]], [SamplingParams(max_tokens=4), SamplingParams(top_k=2**63)],
                          use_tqdm=False)
    out = tiny_llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_engine_rejects_one_request_while_others_run():
    engine = create_engine(EngineConfig(model="random:tiny", device="cpu", dtype="float32", max_model_len=32))
    engine.add_request("good", None, SamplingParams(max_tokens=5, ignore_eos=True), prompt_token_ids=[4, 5, 6])
    engine.step()
    ids_range = r"\[0, 512\)"
    for bad_ids, match in (([1] * 40, "max_model_len"), ([], "empty"), ([1, 99999], ids_range), ([3, -1], ids_range),
                           ([1, True], ids_range), ([2.0], ids_range), ([1, "2"], ids_range), ([2**70], ids_range),
                           ([1, None], ids_range), ([512], ids_range)):
        with pytest.raises(ValueError, match=match):
            engine.add_request("bad", None, SamplingParams(), prompt_token_ids=bad_ids)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("good", None, SamplingParams(), prompt_token_ids=[1])
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == ["good"] and len(finished[0].outputs[0].token_ids) == 5
    engine.shutdown()


def test_generate_argument_errors(tiny_llm):
    with pytest.raises(ValueError, match="sampling_params"):
        tiny_llm.generate([[1], [2]], [SamplingParams()], use_tqdm=False)
    with pytest.raises(ValueError, match="temperature"):
        tiny_llm.generate([[1]], SamplingParams(temperature=-1), use_tqdm=False)


def test_cli_reports_errors_with_status_2(capsys, tmp_path):
    assert main(["generate", "--model", str(tmp_path / "nothing")]) == 2
    assert "tandem: error:" in capsys.readouterr().err
    assert main(["generate", "--model", "random:tiny", "--prompt", "hi", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert main(["serve"]) == 2
    assert "needs --model" in capsys.readouterr().err


def test_cli_generates(capsys):
    assert main(["generate", "--model", "random:tiny", "--prompt", "Hello", "--max-tokens", "5", "--ignore-eos"]) == 0
    assert "5 tokens, finish_reason=length" in capsys.readouterr().err


def test_streaming_requests_get_an_output_per_token():
    engine = create_engine(EngineConfig(model="random:tiny", device="cpu", dtype="float32"))
    engine.add_request("s", None, SamplingParams(max_tokens=6, ignore_eos=True), prompt_token_ids=[3, 4], stream=True)
    engine.add_request("q", None, SamplingParams(max_tokens=6, ignore_eos=True), prompt_token_ids=[3, 4])
    seen = {"s": [], "q": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(len(out.outputs[0].token_ids))
    assert seen == {"s": [1, 2, 3, 4, 5, 6], "q": [6]}
    engine.shutdown()


@pytest.mark.parametrize("where", ["core.step", "worker.submit", "worker.collect"])
@pytest.mark.parametrize("async_batching", [True, False])
def test_an_interrupted_llm_keeps_working_with_the_same_outputs(async_batching, where, monkeypatch):
    """Ctrl-C between steps, after a step was planned but before it was launched, or while waiting
    for the device: the engine drains, ends every request, and runs the next batch as a fresh one."""
    prompts = [torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 30, 12)]
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=25, ignore_eos=True),
              SamplingParams(temperature=0.7, seed=9, max_tokens=15, ignore_eos=True)]
    options = dict(device="cpu", max_model_len=64, kv_cache_tokens=256, async_batching=async_batching)
    expected = [o.outputs[0].token_ids for o in LLM("random:tiny", **options).generate(prompts, params, use_tqdm=False)]
    llm = LLM("random:tiny", **options)
    core = llm.engine.core
    owner = core if where == "core.step" else core.worker
    name = where.split(".")[1]
    real, calls = getattr(owner, name), []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(owner, name, interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts, params, use_tqdm=False)
    monkeypatch.setattr(owner, name, real)
    assert not llm.engine.has_unfinished_requests() and core.scheduler.kv_usage() == 0
    assert core.scheduler.rows.num_free == core.scheduler.rows.num_rows
    again = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert again == expected
