"""Tiny random-weight Hugging Face checkpoints built on disk, plus transformers reference outputs.

Everything is made locally with transformers' own config/model classes and ``save_pretrained`` (no hub),
so the files have exactly the layout and keys a real checkpoint of that transformers version has.

The variants deliberately differ in what an engine tends to get wrong: GQA ratios, a ``head_dim`` that is
not ``hidden_size // num_attention_heads``, tied vs untied embeddings, q/k/v biases (Qwen2), q/k norms
(Qwen3), and llama3 rope scaling (Llama) with a small original context so the scaling changes real
frequencies of the tiny model.

Note on transformers 5: a saved config.json holds rope settings only as ``rope_parameters``
(``{"rope_type", "rope_theta", ...}``); the top-level ``rope_theta``/``rope_scaling`` keys that hub
checkpoints made with transformers 4 carry are not written. ``build_checkpoint(..., legacy_rope=True)``
rewrites config.json in that older layout, so loaders can be tested on both."""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB_SIZE = 448
MAX_POSITIONS = 1024

# Special tokens come first in the trainer's list, so their ids are 0..4 in this order.
BOS, EOS, PAD, IM_START = "<s>", "<|im_end|>", "<pad>", "<|im_start|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, IM_START]
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2

# ChatML-style; the turn terminator is the eos token, so chat generation stops on it.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Once upon a time there was a small village by the sea, where the fishermen told stories every night.
The weather today is sunny with a light breeze, and tomorrow it will rain in the afternoon.
Language models predict the next token given the previous tokens in the sequence.
An inference engine schedules requests, batches them together, and reuses the key value cache.
Hello, how are you? I am fine, thank you. What is your name? My name is Alice, and this is Bob.
She sells sea shells on the sea shore. Peter Piper picked a peck of pickled peppers.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 1000 2024. Punctuation: ! ? , . ; : ' " ( ) [ ] { } - _
The cat sat on the mat. The dog ran in the park. The bird sang in the tree near the river.
Write a short poem about the moon. Explain how attention works in a transformer model.
"""

# One entry per architecture: the transformers classes and the config kwargs that make it tiny.
# head_dim is set explicitly (!= hidden/heads) where the config class declares it; Qwen2Config does not
# declare head_dim (real Qwen2 config.json files lack it), so qwen2 uses the derived hidden/heads = 16.
_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE, hidden_size=64, max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-6,
    bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
)
ARCHS: dict[str, dict] = {
    "llama": dict(
        model_cls="LlamaForCausalLM", config_cls="LlamaConfig", tie=False,
        config=dict(
            _COMMON, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
            intermediate_size=128, tie_word_embeddings=False,
            # original_max_position_embeddings=64 puts head_dim-24 frequencies in all three llama3 regimes
            # (kept, smoothed, divided by factor), so a loader that ignores the scaling diverges quickly.
            rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                 high_freq_factor=4.0, original_max_position_embeddings=64),
        ),
    ),
    "qwen2": dict(
        model_cls="Qwen2ForCausalLM", config_cls="Qwen2Config", tie=True,
        config=dict(
            _COMMON, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=160, tie_word_embeddings=True, use_sliding_window=False,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        ),
    ),
    "qwen3": dict(
        model_cls="Qwen3ForCausalLM", config_cls="Qwen3Config", tie=True,
        config=dict(
            _COMMON, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=24,
            intermediate_size=128, tie_word_embeddings=True, use_sliding_window=False,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        ),
    ),
    "mistral": dict(
        model_cls="MistralForCausalLM", config_cls="MistralConfig", tie=False,
        config=dict(
            _COMMON, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
            hidden_size=96, intermediate_size=192, tie_word_embeddings=False,
            # MistralModel does apply sliding_window (sliding-window causal mask), so leave it off: the
            # reference would otherwise depend on the engine implementing windows for this test model.
            sliding_window=None,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
    ),
    # Gemma: windows of 8 (shorter than the prompts) on the sliding layers, global layers between
    # them; query_pre_attn_scalar != head_dim; soft-caps small enough to bend the scores and logits.
    # Untied (real Gemmas tie; the random:tiny-gemma presets do): a tied table scaled by sqrt(hidden)
    # swamps these tiny models, whose greedy outputs then mostly repeat a few tokens
    "gemma2": dict(
        model_cls="Gemma2ForCausalLM", config_cls="Gemma2Config", tie=False,
        config=dict(
            _COMMON, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
            intermediate_size=128, tie_word_embeddings=False, query_pre_attn_scalar=32, sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            attn_logit_softcapping=20.0, final_logit_softcapping=10.0,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
    ),
    "gemma3": dict(
        model_cls="Gemma3ForCausalLM", config_cls="Gemma3TextConfig", tie=False,
        config=dict(
            _COMMON, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
            intermediate_size=128, tie_word_embeddings=False, query_pre_attn_scalar=48, sliding_window=8,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={"sliding_attention": dict(rope_type="default", rope_theta=10000.0),
                             "full_attention": dict(rope_type="linear", factor=4.0, rope_theta=1000000.0)},
        ),
    ),
}


# Mixtures of experts (E experts, k per token, even E for expert parallelism over 2 ranks): Qwen3-MoE
# with a dense layer (mlp_only_layers) and renormalised top-k; Qwen2-MoE with a shared expert, dense
# layers between sparse ones (decoder_sparse_step) and raw top-k weights; Mixtral. transformers 5
# saves their experts one tensor per expert (tests/test_moe_models.py writes the fused layout too).
ARCHS.update({
    "qwen3_moe": dict(
        model_cls="Qwen3MoeForCausalLM", config_cls="Qwen3MoeConfig", tie=False,
        config=dict(
            _COMMON, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
            intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=3,
            norm_topk_prob=True, mlp_only_layers=[1], tie_word_embeddings=False, use_sliding_window=False,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        ),
    ),
    "qwen2_moe": dict(
        model_cls="Qwen2MoeForCausalLM", config_cls="Qwen2MoeConfig", tie=False,
        config=dict(
            _COMMON, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
            moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=6, num_experts_per_tok=2,
            norm_topk_prob=False, decoder_sparse_step=2, tie_word_embeddings=False, use_sliding_window=False,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        ),
    ),
    "mixtral": dict(
        model_cls="MixtralForCausalLM", config_cls="MixtralConfig", tie=False,
        config=dict(
            _COMMON, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
            sliding_window=None, rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        ),
    ),
})


# Through the transformers backend (no native family): each with what sets it apart from Llama.
ARCHS.update({
    # fused qkv_proj / gate_up_proj, half the head dims rotated
    "phi3": dict(
        model_cls="Phi3ForCausalLM", config_cls="Phi3Config", tie=False,
        config=dict(
            _COMMON, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            tie_word_embeddings=False, sliding_window=None,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5),
        ),
    ),
    # q/k RMSNorm over the whole projection, norms after attention and MLP instead of before
    "olmo2": dict(
        model_cls="Olmo2ForCausalLM", config_cls="Olmo2Config", tie=False,
        config=dict(
            _COMMON, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            tie_word_embeddings=False, rope_parameters=dict(rope_type="default", rope_theta=500000.0),
        ),
    ),
    # muP multipliers: embeddings, residual branches, attention scale (not 1/sqrt(head_dim)), logits
    "granite": dict(
        model_cls="GraniteForCausalLM", config_cls="GraniteConfig", tie=True,
        config=dict(
            _COMMON, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, intermediate_size=128,
            tie_word_embeddings=True, embedding_multiplier=1.5, residual_multiplier=0.8,
            attention_multiplier=0.3, logits_scaling=2.5,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
    ),
    # LayerNorm with bias, per-head q/k LayerNorm, QKV bias, a quarter of the head dims rotated
    "stablelm": dict(
        model_cls="StableLmForCausalLM", config_cls="StableLmConfig", tie=False,
        config=dict(
            _COMMON, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            tie_word_embeddings=False, use_qkv_bias=True, qk_layernorm=True, use_parallel_residual=False,
            layer_norm_eps=1e-5, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                      partial_rotary_factor=0.25),
        ),
    ),
    # per-layer sliding windows of 8 (shorter than the prompts) with a global layer without rotary
    # between them; parallel attention + MLP block, LayerNorm, logits times logit_scale
    "cohere2": dict(
        model_cls="Cohere2ForCausalLM", config_cls="Cohere2Config", tie=True,
        config=dict(
            _COMMON, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            tie_word_embeddings=True, sliding_window=8, logit_scale=0.5, layer_norm_eps=1e-5,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
    ),
})

def _llama_with_rope(**rope: Any) -> dict:
    """The llama entry with another rope scaling: same shapes and weights (same seed), other frequencies."""
    return dict(ARCHS["llama"], config=dict(ARCHS["llama"]["config"], rope_parameters=rope))


# yarn: the ramp falls between dims 2.1 and 3.9 of 12 (beta_fast=4, not truncated), the rest divided by 8,
# and cos/sin times 0.1 ln 8 + 1. longrope: the short factors (every sequence is within
# original_max_position_embeddings=256, where tandem runs it), the derived factor 1024/256 giving cos/sin
# times sqrt(1 + ln 4 / ln 256).
ARCHS["llama-yarn"] = _llama_with_rope(rope_type="yarn", rope_theta=10000.0, factor=8.0, beta_fast=4.0,
                                       beta_slow=1.0, truncate=False, original_max_position_embeddings=128)
ARCHS["llama-longrope"] = _llama_with_rope(
    rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=256,
    short_factor=[1.0, 1.1, 1.3, 1.2, 1.7, 2.0, 2.6, 2.4, 3.1, 3.9, 4.2, 5.0],
    long_factor=[1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 19.0, 27.0, 38.0, 52.0, 70.0])


def make_config(arch: str) -> transformers.PreTrainedConfig:
    """The transformers config object of one ARCHS entry."""
    spec = ARCHS[arch]
    return getattr(transformers, spec["config_cls"])(**spec["config"])


@functools.lru_cache(maxsize=None)
def _trained_tokenizer() -> Tokenizer:
    """Byte-level BPE trained on the built-in corpus (deterministic; trained once per process)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text is encodable
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    # The corpus is too small to reach VOCAB_SIZE by merges alone; pad with unused filler tokens so
    # that the tokenizer's vocab and the model's embedding table have the same size.
    filler = [f"<|unused{i}|>" for i in range(VOCAB_SIZE - tok.get_vocab_size())]
    if filler:
        tok.add_special_tokens(filler)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    assert [tok.token_to_id(t) for t in (BOS, EOS, PAD)] == [BOS_ID, EOS_ID, PAD_ID]
    return tok


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """The trained tokenizer wrapped for transformers, with special tokens and a chat template."""
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer().to_str()),  # a copy: wrappers mutate it
        bos_token=BOS, eos_token=EOS, pad_token=PAD, additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE, model_max_length=MAX_POSITIONS, clean_up_tokenization_spaces=False,
    )


# (norm, bias, embedding/head, other linear) std: "parity" avoids greedy near-ties; "realistic" is
# transformers' usual 0.02 initialisation, the scale trained models have, for precision checks.
SCALES = {"parity": (0.1, 0.1, 0.5, 0.25), "realistic": (0.02, 0.02, 0.02, 0.02)}


def _randomize(model: torch.nn.Module, seed: int, scales: str = "parity") -> None:
    """Re-initialise every parameter so no weight is exactly 0 or 1 (biases, norms and q/k norms too).

    The scales were picked by measurement: embeddings/lm_head std 0.5 gives logits of std ~4, so
    greedy near-ties (top-2 gap < 1e-3) are rare (<0.1% of positions), and linear std 0.25 lets the
    layers outweigh the residual embedding, so greedy outputs do not collapse into repeating one token
    (tied models with small weights mostly did)."""
    gen = torch.Generator().manual_seed(seed)
    norm_std, bias_std, embed_std, linear_std = SCALES[scales]
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied lm_head is the same tensor: visited once
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("bias"):  # LayerNorm biases too: near 1 they swamp the hidden state
                scale, offset = bias_std, 0.0
            elif "norm" in name:
                scale, offset = norm_std, 1.0
            elif "embed_tokens" in name or "lm_head" in name:
                scale, offset = embed_std, 0.0
            else:
                scale, offset = linear_std, 0.0
            p.copy_(offset + scale * noise)


def build_checkpoint(arch: str, path: Path, *, seed: int = 0, sharded: bool = False,
                     dtype: torch.dtype = torch.float32, legacy_rope: bool = False, scales: str = "parity") -> Path:
    """Write a tiny random checkpoint of ``arch`` into ``path`` and return ``path``.

    Files: config.json, model.safetensors (or model-0000x-of-0000n.safetensors + index when
    ``sharded``), generation_config.json and the tokenizer files. ``legacy_rope`` rewrites config.json
    with top-level rope_theta/rope_scaling as transformers-4-era hub checkpoints have them."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = make_config(arch)
    model = getattr(transformers, ARCHS[arch]["model_cls"])(config).eval()
    _randomize(model, seed, scales)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False)
    model.to(dtype)
    # The whole model is ~1 MB; 200KB shards force several files (each tensor is < 200KB).
    model.save_pretrained(path, max_shard_size="200KB" if sharded else "10GB")
    make_tokenizer().save_pretrained(path)
    if legacy_rope:
        _rewrite_rope_legacy(path / "config.json")
    return path


def edited_copy(src: Path, dst: Path, **changes: Any) -> Path:
    """A copy of checkpoint ``src`` at ``dst`` with ``changes`` made to its config.json."""
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _rewrite_rope_legacy(config_json: Path) -> None:
    """rope_parameters -> rope_theta (+ rope_scaling unless default), the transformers 4 layout."""
    cfg = json.loads(config_json.read_text())
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = None if rope.get("rope_type") == "default" else rope
    config_json.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


@functools.lru_cache(maxsize=16)
def _load(path: str, dtype: torch.dtype, device: str) -> transformers.PreTrainedModel:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    return model.to(device).eval()


def _key(path: str | Path) -> str:
    return str(Path(path).resolve())  # one cache entry whatever form the path is given in


def hf_greedy(path: str | Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of one prompt (fp32, CPU): new ids only, EOS included if hit."""
    model = _load(_key(path), torch.float32, "cpu")
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, min_new_tokens=0,
            do_sample=False, num_beams=1, eos_token_id=model.config.eos_token_id,
            pad_token_id=model.config.pad_token_id,
        )
    return out[0, ids.shape[1]:].tolist()


def hf_prefill_logits(path: str | Path, prompt_ids: list[int], dtype: torch.dtype = torch.float32,
                      device: str = "cpu") -> torch.Tensor:
    """Logits [len(prompt_ids), vocab] of one transformers forward pass, returned as float32 on CPU."""
    model = _load(_key(path), dtype, str(device))
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    return logits[0].float().cpu()
