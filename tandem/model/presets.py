"""Random-weight presets with real model shapes, so benchmarks need no checkpoint files."""
from __future__ import annotations

import dataclasses

from tandem.model.model_config import ModelConfig, model_config_from_dict
from tandem.tokenizer import BYTE_BOS, BYTE_EOS

_LLAMA3_1B_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}


def _preset(arch: str, **kw) -> ModelConfig:
    return ModelConfig(architecture=arch, eos_token_ids=[BYTE_EOS], bos_token_id=BYTE_BOS, **kw)


def _from_hf(arch: str, **hf) -> ModelConfig:
    """A preset from config.json fields, parsed as a checkpoint's are: for families that read their
    own fields from ``hf`` (Gemma)."""
    cfg = model_config_from_dict({"architectures": [arch], **hf})
    return dataclasses.replace(cfg, eos_token_ids=[BYTE_EOS], bos_token_id=BYTE_BOS)


# Gemma 3 text: 5 sliding-window layers to 1 global, local rope base 1e4, global 1e6 (the 4B's with
# linear scaling x8), attention scale 256 ** -0.5, (1 + w) norms, GELU-tanh; tied embeddings
_GEMMA3 = dict(rms_norm_eps=1e-6, query_pre_attn_scalar=256, sliding_window_pattern=6, rope_local_base_freq=10_000.0,
               tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=None,
               attn_logit_softcapping=None)

# Mixtures of experts (config.json fields, as their families read them from ``hf``)
_QWEN3_MOE = dict(rms_norm_eps=1e-6, hidden_act="silu", decoder_sparse_step=1, mlp_only_layers=[],
                  norm_topk_prob=True, tie_word_embeddings=False, use_sliding_window=False)
_MIXTRAL = dict(rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False)

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
    # The published shapes of Gemma 3 4B (text part of gemma-3-4b) and Gemma 3 1B (gemma-3-1b)
    "gemma3-4b": _from_hf("Gemma3ForCausalLM", vocab_size=262208, hidden_size=2560, num_hidden_layers=34,
                          num_attention_heads=8, num_key_value_heads=4, head_dim=256, intermediate_size=10240,
                          sliding_window=1024, rope_theta=1_000_000.0,
                          rope_scaling={"rope_type": "linear", "factor": 8.0},
                          max_position_embeddings=131072, **_GEMMA3),
    "gemma3-1b": _from_hf("Gemma3ForCausalLM", vocab_size=262144, hidden_size=1152, num_hidden_layers=26,
                          num_attention_heads=4, num_key_value_heads=1, head_dim=256, intermediate_size=6912,
                          sliding_window=512, rope_theta=1_000_000.0, max_position_embeddings=32768, **_GEMMA3),
    # Tiny Gemmas for tests (the byte tokenizer's vocabulary): windows shorter than their prompts,
    # sliding and global layers, Gemma 2's attention and final soft-caps, Gemma 3's q/k norms and
    # linear-scaled global rope
    "tiny-gemma2": _from_hf("Gemma2ForCausalLM", vocab_size=512, hidden_size=64, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                            query_pre_attn_scalar=24, sliding_window=16, attn_logit_softcapping=0.1,
                            final_logit_softcapping=0.5, max_position_embeddings=4096),
    "tiny-gemma3": _from_hf("Gemma3ForCausalLM", vocab_size=512, hidden_size=64, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                            sliding_window=16, max_position_embeddings=4096,
                            rope_scaling={"rope_type": "linear", "factor": 2.0},
                            **dict(_GEMMA3, sliding_window_pattern=3, query_pre_attn_scalar=24)),
    # Qwen3-30B-A3B's published shapes: 48 layers of 128 experts (8 per token) of width 768, 30.5B
    # parameters, 3.3B of them active per token (61 GB in bf16: one H100)
    "qwen3-30b-a3b": _from_hf("Qwen3MoeForCausalLM", vocab_size=151936, hidden_size=2048, num_hidden_layers=48,
                              num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
                              num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, rope_theta=1e6,
                              max_position_embeddings=40960, **_QWEN3_MOE),
    # Mixtral-8x7B's published shapes: 32 layers of 8 experts (2 per token) of width 14336, 46.7B
    # parameters (93 GB in bf16): for tensor_parallel_size=2 or larger, or one H200
    "mixtral-8x7b": _from_hf("MixtralForCausalLM", vocab_size=32000, hidden_size=4096, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=14336,
                             num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6,
                             max_position_embeddings=32768, **_MIXTRAL),
    # Tiny mixtures of experts for tests (the byte tokenizer's vocabulary): a dense layer between
    # sparse ones (Qwen3's mlp_only_layers), Mixtral's window shorter than the prompts
    "tiny-qwen3-moe": _from_hf("Qwen3MoeForCausalLM", vocab_size=512, hidden_size=64, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                               num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, rope_theta=1e6,
                               max_position_embeddings=4096, **dict(_QWEN3_MOE, mlp_only_layers=[1])),
    "tiny-mixtral": _from_hf("MixtralForCausalLM", vocab_size=512, hidden_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=64,
                             num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6, sliding_window=16,
                             max_position_embeddings=4096, **_MIXTRAL),
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
