"""Seeded sampling is reproducible in any batch; bad inputs give clear errors and change nothing else."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import build_checkpoint

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


def test_engine_rejects_one_request_while_others_run():
    engine = create_engine(EngineConfig(model="random:tiny", device="cpu", dtype="float32", max_model_len=32))
    engine.add_request("good", None, SamplingParams(max_tokens=5, ignore_eos=True), prompt_token_ids=[4, 5, 6])
    engine.step()
    for bad_ids, match in (([1] * 40, "max_model_len"), ([], "empty"), ([1, 99999], r"\[0, 512\)")):
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


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_unknown_architecture(tmp_path, checkpoint):
    path = _copy(checkpoint, tmp_path / "gpt2")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel"):
        LLM(str(path), device="cpu")


def test_missing_weights(tmp_path, checkpoint):
    path = _copy(checkpoint, tmp_path / "noweights")
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LLM(str(path), device="cpu")


def test_missing_tensor_is_named(tmp_path, checkpoint):
    path = _copy(checkpoint, tmp_path / "notensor")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj.weight"):
        LLM(str(path), device="cpu")


def test_shape_mismatch_is_named(tmp_path, checkpoint):
    path = _copy(checkpoint, tmp_path / "badshape")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"gate_proj.weight.*shape \(128, 64\).*\(136, 64\)"):
        LLM(str(path), device="cpu")


def test_missing_shard(tmp_path):
    path = build_checkpoint("llama", tmp_path / "sharded", sharded=True)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    (path / sorted(set(index["weight_map"].values()))[-1]).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        LLM(str(path), device="cpu")


def test_unknown_preset_and_missing_folder():
    with pytest.raises(ValueError, match="unknown preset.*random:tiny"):
        LLM("random:gpt5", device="cpu")
    with pytest.raises(FileNotFoundError, match="not downloaded"):
        LLM("meta-llama/Llama-3-8B", device="cpu")


def test_cli_reports_errors_with_status_2(capsys, tmp_path):
    assert main(["generate", "--model", str(tmp_path / "nothing")]) == 2
    assert "tandem: error:" in capsys.readouterr().err
    assert main(["generate", "--model", "random:tiny", "--prompt", "hi", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert main(["serve"]) == 2
    assert "not implemented" in capsys.readouterr().err


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
