"""Self-tests of the tiny checkpoint fixtures: they must be what the engine tests assume they are."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

import pytest
import torch
import transformers
from safetensors import safe_open

from checkpoints import ARCHS, EOS_ID, VOCAB_SIZE, build_checkpoint, hf_greedy, hf_prefill_logits

CheckpointDir = Callable[[str], Path]


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB_SIZE) for _ in range(rng.randint(1, 24))] for _ in range(n)]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_loads_back_with_gqa_and_head_dim(arch: str, checkpoint_dir: CheckpointDir) -> None:
    path = checkpoint_dir(arch)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    cfg = model.config
    assert type(model).__name__ == ARCHS[arch]["model_cls"]
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert head_dim != 64
    # the modules really use that head_dim (and the kv head count)
    attn = model.model.layers[0].self_attn
    if hasattr(attn, "qkv_proj"):  # Phi-3 fuses them in the checkpoint
        assert attn.qkv_proj.out_features == (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * head_dim
    else:
        assert attn.q_proj.out_features == cfg.num_attention_heads * head_dim
        assert attn.k_proj.out_features == cfg.num_key_value_heads * head_dim
    assert cfg.vocab_size == VOCAB_SIZE == model.get_input_embeddings().num_embeddings
    assert cfg.max_position_embeddings >= 512
    tied = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tied == ARCHS[arch]["tie"] == cfg.tie_word_embeddings


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_eos_consistent_and_weights_random(arch: str, checkpoint_dir: CheckpointDir) -> None:
    path = checkpoint_dir(arch)
    config = json.loads((path / "config.json").read_text())
    gen = json.loads((path / "generation_config.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert config["eos_token_id"] == gen["eos_token_id"] == tok.eos_token_id == EOS_ID
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        for name in names:
            t = f.get_tensor(name)
            assert not torch.any(t == 0) and not torch.any(t == 1), name  # nothing left at its init value
    assert ("lm_head.weight" in names) != ARCHS[arch]["tie"]  # tied checkpoints store no lm_head


def test_llama3_rope_scaling_in_config_json(checkpoint_dir: CheckpointDir) -> None:
    config = json.loads((checkpoint_dir("llama") / "config.json").read_text())
    rope = config["rope_parameters"]  # transformers 5 layout; no top-level rope_theta/rope_scaling
    assert rope["rope_type"] == "llama3"
    assert rope["rope_theta"] == 500000.0 and rope["factor"] == 8.0
    assert rope["low_freq_factor"] == 1.0 and rope["high_freq_factor"] == 4.0
    assert rope["original_max_position_embeddings"] < config["max_position_embeddings"]


def test_legacy_rope_layout_loads_identically(checkpoint_dir: CheckpointDir, tmp_path: Path) -> None:
    legacy = build_checkpoint("llama", tmp_path / "legacy", legacy_rope=True)
    config = json.loads((legacy / "config.json").read_text())
    assert "rope_parameters" not in config and config["rope_theta"] == 500000.0
    assert config["rope_scaling"]["rope_type"] == "llama3"
    ids = list(range(3, 100))
    assert torch.equal(hf_prefill_logits(legacy, ids), hf_prefill_logits(checkpoint_dir("llama"), ids))


def test_llama3_scaling_changes_logits(checkpoint_dir: CheckpointDir) -> None:
    """The scaling must matter for this tiny model, or a loader ignoring it would pass the tests."""
    path = checkpoint_dir("llama")
    cfg = transformers.AutoConfig.from_pretrained(path)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_parameters["rope_theta"]}
    plain = transformers.AutoModelForCausalLM.from_pretrained(path, config=cfg, attn_implementation="eager")
    ids = list(range(3, 83))
    with torch.no_grad():
        unscaled = plain(torch.tensor([ids])).logits[0]
    scaled = hf_prefill_logits(path, ids)
    assert torch.equal(scaled[0], unscaled[0])  # position 0 has no rotation
    assert (scaled[-1] - unscaled[-1]).norm() > 0.1 * scaled[-1].norm()


def test_qwen2_has_nonzero_qkv_bias(checkpoint_dir: CheckpointDir) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint_dir("qwen2"))
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            assert proj.bias is not None and proj.bias.abs().min() > 0 and proj.bias.std() > 0.05


def test_tokenizer_round_trip_and_chat_template(checkpoint_dir: CheckpointDir) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(checkpoint_dir("qwen3"))
    assert len(tok) == VOCAB_SIZE
    for text in ["Hello, how are you?", "  spaces\tand\nnewlines  ", "unicode: é ü 漢字 🙂", "42 + 1000"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert max(ids) < VOCAB_SIZE and tok.decode(ids) == text
    assert tok.chat_template
    messages = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    plain = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert plain.endswith(tok.eos_token + "\n")


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_hf_greedy_length_or_eos(arch: str, checkpoint_dir: CheckpointDir) -> None:
    path = checkpoint_dir(arch)
    for prompt in _prompts(6):
        out = hf_greedy(path, prompt, 12)
        assert all(0 <= t < VOCAB_SIZE for t in out)
        if EOS_ID in out:  # stopped on EOS: it is the last token and nothing follows
            assert out.index(EOS_ID) == len(out) - 1 and len(out) <= 12
        else:
            assert len(out) == 12
    # greedy is a function of the prompt and agrees with one full forward pass
    prompt = _prompts(1, seed=1)[0]
    out = hf_greedy(path, prompt, 5)
    assert out == hf_greedy(str(path), prompt, 5)
    logits = hf_prefill_logits(path, prompt + out[:-1])
    assert logits.shape == (len(prompt) + len(out) - 1, VOCAB_SIZE)
    assert logits[len(prompt) - 1:].argmax(-1).tolist() == out


def test_greedy_not_degenerate(checkpoint_dir: CheckpointDir) -> None:
    """Outputs should vary, so parity tests can catch position/cache bugs; some prompts hit EOS."""
    hit_eos = 0
    for arch in ARCHS:
        outs = [hf_greedy(checkpoint_dir(arch), p, 16) for p in _prompts(8, seed=2)]
        assert len({t for o in outs for t in o}) > 30, arch
        hit_eos += sum(EOS_ID in o for o in outs)
    assert hit_eos >= 1


def test_sharded_checkpoint(sharded_checkpoint: Path, checkpoint_dir: CheckpointDir) -> None:
    index = json.loads((sharded_checkpoint / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2 and all((sharded_checkpoint / s).is_file() for s in shards)
    assert not (sharded_checkpoint / "model.safetensors").exists()
    ids = list(range(3, 40))
    assert torch.equal(hf_prefill_logits(sharded_checkpoint, ids), hf_prefill_logits(checkpoint_dir("llama"), ids))


def test_bf16_checkpoint(tmp_path: Path) -> None:
    path = build_checkpoint("mistral", tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    logits = hf_prefill_logits(path, [5, 6, 7], dtype=torch.bfloat16)
    assert logits.dtype == torch.float32 and logits.shape == (3, VOCAB_SIZE)
