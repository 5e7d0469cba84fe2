"""The offline ``LLM`` in vLLM's shape (issue 26, point 1): prompt dicts and ``TokensPrompt``,
``get_tokenizer()``, ``llm_engine``, vLLM's constructor options, generation_config.json's request
defaults, and the start-up log and weight-loading progress."""
from __future__ import annotations

import json
import logging
import shutil

import pytest

from tandem import LLM, SamplingParams
from tandem.inputs import TextPrompt, TokensPrompt, parse_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def sampled_checkpoint(checkpoint_dir, tmp_path_factory):
    """The llama checkpoint whose generation_config.json sets vLLM's sampling defaults."""
    path = tmp_path_factory.mktemp("gen") / "llama"
    shutil.copytree(checkpoint_dir("llama"), path)
    gen = json.loads((path / "generation_config.json").read_text())
    gen.update(temperature=0.6, top_p=0.9, top_k=50, repetition_penalty=1.1, max_new_tokens=5)
    (path / "generation_config.json").write_text(json.dumps(gen))
    return path


@pytest.fixture(scope="module")
def llm(sampled_checkpoint):
    return LLM(str(sampled_checkpoint), device="cpu", max_model_len=128, tokenizer=str(sampled_checkpoint),
               trust_remote_code=True, max_logprobs=3)


def test_prompts_in_every_vllm_form_give_the_same_tokens(llm):
    ids = llm.get_tokenizer().encode("Once upon a time")
    forms = ["Once upon a time", TextPrompt(prompt="Once upon a time"), TokensPrompt(prompt_token_ids=ids),
             {"prompt_token_ids": ids, "prompt": "Once upon a time"}, ids]
    outs = llm.generate(forms, GREEDY, use_tqdm=False)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1 and len(outs[0].outputs[0].token_ids) == 4
    assert [o.prompt for o in outs] == ["Once upon a time"] * 2 + [None, "Once upon a time", None]
    assert all(o.prompt_token_ids == ids for o in outs)
    single = llm.generate(TokensPrompt(prompt_token_ids=ids), GREEDY, use_tqdm=False)  # one, not in a list
    assert single[0].outputs[0].token_ids == outs[0].outputs[0].token_ids


def test_prompt_keys_tandem_cannot_honour_are_refused_by_name(llm):
    for prompt, why in [({"prompt": "x", "multi_modal_data": {}}, "multi_modal_data.*text-only"),
                        ({"prompt_token_ids": [1], "cache_salt": "s"}, "cache_salt"),
                        ({"prompt": "x", "propmt": "y"}, "unknown prompt key.*propmt"),
                        ({}, "needs 'prompt'"), ({"prompt_token_ids": "12"}, "list of ints"), (3.5, "float")]:
        with pytest.raises(ValueError, match=why):
            llm.generate([prompt], GREEDY, use_tqdm=False)
    assert parse_prompts([[1, 2], [3]]) == [(None, [1, 2]), (None, [3])]


def test_vllm_names_for_the_engine_and_the_tokenizer(llm):
    assert llm.llm_engine is llm.engine and llm.get_tokenizer() is llm.tokenizer is not None
    assert llm.llm_engine.config.trust_remote_code is True
    with pytest.raises(ValueError, match="max_logprobs=3"):
        llm.generate("hi", SamplingParams(logprobs=4, max_tokens=1), use_tqdm=False)
    with pytest.raises(ValueError, match="unknown engine option.*'lora_modules'"):
        LLM("random:tiny", lora_modules=["x"])
    with pytest.raises(ValueError, match="revision 'main' applies to Hugging Face ids"):
        LLM("random:tiny", revision="main")


def test_chat_takes_vllms_template_keywords(llm):
    messages = [{"role": "user", "content": "hi"}]
    template = "{% for m in messages %}<{{ m['content'] }}|{{ shout }}>{% endfor %}"
    out = llm.chat(messages, GREEDY, use_tqdm=False, chat_template=template, chat_template_kwargs={"shout": "HEY"})
    assert out[0].prompt_token_ids == llm.get_tokenizer().encode("<hi|HEY>", add_special_tokens=False)
    plain = llm.chat(messages, GREEDY, use_tqdm=False)[0].prompt_token_ids  # the checkpoint's template
    assert plain != out[0].prompt_token_ids
    with pytest.raises(ValueError, match="cannot both be true"):
        llm.chat(messages, GREEDY, use_tqdm=False, continue_final_message=True)


def test_generation_config_auto_gives_the_request_defaults(llm, sampled_checkpoint):
    defaults = llm.get_default_sampling_params()
    # top_k 50 is transformers' own default, which vLLM's reading of the file leaves out
    assert (defaults.temperature, defaults.top_p, defaults.top_k, defaults.repetition_penalty,
            defaults.max_tokens) == (0.6, 0.9, 0, 1.1, 5)
    out = llm.generate("Once", use_tqdm=False)[0].outputs[0]  # no sampling_params: the defaults
    assert len(out.token_ids) <= 5 and (len(out.token_ids) == 5 or out.finish_reason == "stop")
    plain = LLM("random:tiny", generation_config=str(sampled_checkpoint))  # a folder's file
    assert plain.get_default_sampling_params().max_tokens == 5
    vllm = LLM("random:tiny", generation_config="vllm")
    assert vllm.get_default_sampling_params() == SamplingParams()
    with pytest.raises(FileNotFoundError, match="neither auto, vllm nor a folder"):
        LLM("random:tiny", generation_config="nope")


def test_the_cli_takes_the_same_defaults(sampled_checkpoint, capsys):
    from tandem.cli import main

    assert main(["generate", str(sampled_checkpoint), "--prompt", "Once", "--ignore-eos", "--device", "cpu",
                 "--max-model-len", "64"]) == 0
    assert "[5 tokens, finish_reason=length]" in capsys.readouterr().err  # max_new_tokens, not a CLI default


def test_a_bad_generation_config_value_is_named(checkpoint_dir, tmp_path):
    path = tmp_path / "llama"
    shutil.copytree(checkpoint_dir("llama"), path)
    (path / "generation_config.json").write_text(json.dumps({"top_p": 0}))
    with pytest.raises(ValueError, match="generation_config.json: .*top_p"):
        LLM(str(path))


def test_a_separate_tokenizer_serves_prompts_chat_and_grammars(checkpoint_dir, tmp_path):
    from tandem.structured_outputs import StructuredOutputsParams

    source = checkpoint_dir("llama")
    weights_only = tmp_path / "weights"
    weights_only.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(source / name, weights_only / name)
    assert LLM(str(weights_only), device="cpu", max_model_len=64).get_tokenizer() is None
    llm = LLM(str(weights_only), tokenizer=str(source), device="cpu", max_model_len=64)
    params = SamplingParams(temperature=0, max_tokens=12,
                            structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    [out] = llm.chat([{"role": "user", "content": "ok?"}], params, use_tqdm=False)
    assert out.outputs[0].text in ("yes", "no")


def test_start_up_is_logged_and_weight_loading_shows_progress(checkpoint_dir, caplog, monkeypatch):
    import tandem.model.loader as loader

    bars = []

    class Bar:
        def __init__(self, total: int, disable: bool | None, **_: object) -> None:
            self.total, self.n, self.disable, self.closed = total, 0, disable, False
            bars.append(self)

        def update(self, n: int) -> None:
            self.n += n

        def close(self) -> None:
            self.closed = True

    monkeypatch.setattr(loader, "tqdm", Bar)
    with caplog.at_level(logging.INFO):
        LLM(str(checkpoint_dir("llama")), device="cpu", max_model_len=64, kv_cache_tokens=256)
    [bar] = bars
    assert bar.total > 0 and bar.n == bar.total and bar.closed and bar.disable is None  # a terminal decides
    summary = next(r.getMessage() for r in caplog.records if "engine ready in" in r.getMessage())
    assert "on cpu" in summary and "max_model_len 64" in summary and "= 256 tokens" in summary
    assert "dtype float32" in summary
