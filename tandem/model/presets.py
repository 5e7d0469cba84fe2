"""Random-weight presets with real model shapes, so benchmarks need no checkpoint files."""
from __future__ import annotations

from tandem.model.model_config import ModelConfig
from tandem.tokenizer import BYTE_BOS, BYTE_EOS

_LLAMA3_1B_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}


def _preset(arch: str, **kw) -> ModelConfig:
    return ModelConfig(architecture=arch, eos_token_ids=[BYTE_EOS], bos_token_id=BYTE_BOS, **kw)


PRESETS: dict[str, ModelConfig] = {
    "tiny": _preset("LlamaForCausalLM", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=16, intermediate_size=128, rms_norm_eps=1e-5,
                    max_position_embeddings=4096),
    "qwen3-0.6b": _preset("Qwen3ForCausalLM", vocab_size=151936, hidden_size=1024, num_layers=28,
                          num_heads=16, num_kv_heads=8, head_dim=128, intermediate_size=3072,
                          rope_theta=1_000_000.0, max_position_embeddings=40960, tie_word_embeddings=True,
                          qk_norm=True),
    "llama3.2-1b": _preset("LlamaForCausalLM", vocab_size=128256, hidden_size=2048, num_layers=16,
                           num_heads=32, num_kv_heads=8, head_dim=64, intermediate_size=8192,
                           rms_norm_eps=1e-5, rope_theta=500_000.0, rope_scaling=_LLAMA3_1B_ROPE,
                           max_position_embeddings=131072, tie_word_embeddings=True),
    "llama3-8b": _preset("LlamaForCausalLM", vocab_size=128256, hidden_size=4096, num_layers=32,
                         num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336,
                         rms_norm_eps=1e-5, rope_theta=500_000.0, max_position_embeddings=8192),
    # 141 GB in bf16: for tensor parallelism (each rank draws only its shards, on its own GPU)
    "llama3-70b": _preset("LlamaForCausalLM", vocab_size=128256, hidden_size=8192, num_layers=80,
                          num_heads=64, num_kv_heads=8, head_dim=128, intermediate_size=28672,
                          rms_norm_eps=1e-5, rope_theta=500_000.0, max_position_embeddings=8192),
    "qwen3-32b": _preset("Qwen3ForCausalLM", vocab_size=151936, hidden_size=5120, num_layers=64,
                         num_heads=64, num_kv_heads=8, head_dim=128, intermediate_size=25600,
                         rope_theta=1_000_000.0, max_position_embeddings=40960, qk_norm=True),
}

PREFIX = "random:"


def preset_config(name: str) -> ModelConfig:
    key = name.removeprefix(PREFIX)
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PREFIX + k for k in PRESETS)}")
    return PRESETS[key]
