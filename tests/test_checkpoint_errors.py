"""Checkpoints and configs the engine cannot run fail at load with a message naming the problem,
instead of loading and giving wrong tokens; the CLI prints them as ``tandem: error: ...``."""
import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from checkpoints import build_checkpoint, make_tokenizer

from tandem import LLM
from tandem.cli import main


@pytest.fixture(scope="module")
def checkpoint(checkpoint_dir):
    return checkpoint_dir("llama")


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


def _hf_llama(tmp_path, **config):
    """A tiny Llama checkpoint written by transformers itself with the given config settings."""
    cfg = transformers.LlamaConfig(vocab_size=448, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, **config)
    model = transformers.LlamaForCausalLM(cfg)
    path = tmp_path / "hf"
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("setting", [dict(attention_bias=True), dict(mlp_bias=True), dict(hidden_act="gelu")])
def test_unimplemented_config_settings_fail_at_load(tmp_path, setting):
    name = next(iter(setting))
    with pytest.raises(NotImplementedError, match=name):
        LLM(str(_hf_llama(tmp_path, **setting)), device="cpu")


def test_leftover_tensors_are_an_error(tmp_path, checkpoint):
    path = _copy(checkpoint, tmp_path / "leftover")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.randn(64)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="does not use.*o_proj.bias"):
        LLM(str(path), device="cpu")


def test_tied_lm_head_and_rotary_tables_are_not_leftovers(tmp_path, checkpoint_dir):
    path = _copy(checkpoint_dir("qwen3"), tmp_path / "tied-extra")  # tied embeddings
    tensors = load_file(path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(12)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    LLM(str(path), device="cpu", kv_cache_tokens=256)


def test_corrupt_safetensors_file_is_named_by_the_cli(tmp_path, checkpoint, capsys):
    path = _copy(checkpoint, tmp_path / "corrupt")
    (path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    assert main(["generate", "--model", str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tandem: error:") and "model.safetensors" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is absent")
def test_cuda_without_a_gpu_is_a_clear_cli_error(capsys):
    assert main(["generate", "--model", "random:tiny", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "tandem: error: device 'cuda' was requested but no CUDA GPU is available" in err


def test_bad_device_names_are_errors(capsys):
    assert main(["generate", "--model", "random:tiny", "--device", "tpu"]) == 2
    assert "device 'tpu'" in capsys.readouterr().err


def test_max_model_len_beyond_the_model_needs_an_override(checkpoint):
    limit = json.loads((checkpoint / "config.json").read_text())["max_position_embeddings"]
    with pytest.raises(ValueError, match="max_position_embeddings.*allow_long_max_model_len"):
        LLM(str(checkpoint), device="cpu", max_model_len=limit + 1)
    llm = LLM(str(checkpoint), device="cpu", max_model_len=limit + 1, allow_long_max_model_len=True,
              kv_cache_tokens=2 * limit)
    assert llm.engine.max_model_len == limit + 1


@pytest.mark.parametrize("options, match", [(dict(max_num_seqs=0), "max_num_seqs"), (dict(block_size=2.5), "block_size"),
                                            (dict(enforce_eager="no"), "enforce_eager"), (dict(dtype="int8"), "dtype"),
                                            (dict(max_num_sequences=4), "unknown engine option")])
def test_engine_options_are_validated(options, match):
    with pytest.raises(ValueError, match=match):
        LLM("random:tiny", device="cpu", **options)
