"""Tiny random Hugging Face checkpoints made with transformers' own classes, and transformers'
outputs on them (float32, CPU) as the reference. No hub: the tokenizer is trained on the spot."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

CORPUS = ("The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
          "To be or not to be, that is the question. All that glitters is not gold. The early bird catches the "
          "worm. Hello world! How are you today? I am fine, thank you. Numbers: 0 1 2 3 4 5 6 7 8 9. ") * 20
SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

COMMON = dict(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, head_dim=24, max_position_embeddings=512)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}
# arch -> (transformers class names, extra config); GQA 6:2 and head_dim 24 everywhere
ARCHS: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": LLAMA3_ROPE, "tie_word_embeddings": False}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"tie_word_embeddings": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None, "tie_word_embeddings": False}),
}


def train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   chat_template=CHAT_TEMPLATE)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Nothing exactly zero or one: biases and norm weights random too."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_(1.0 + noise if "norm" in name else noise)


def build_checkpoint(arch: str, path: Path, *, seed: int = 0, sharded: bool = False) -> Path:
    import transformers

    config_name, model_name, extra = ARCHS[arch]
    tokenizer = train_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("</s>")
    config = getattr(transformers, config_name)(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                                                **COMMON, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    _randomize(model, seed)
    model.generation_config.eos_token_id = eos
    model.save_pretrained(path, max_shard_size="200KB" if sharded else "5GB")
    tokenizer.save_pretrained(path)
    return path


@functools.lru_cache(maxsize=8)
def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def hf_greedy(path: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy generate, one prompt at a time (no padding): new tokens only."""
    model = hf_model(path)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        # an explicit mask: without one, generate() masks any prompt token equal to the pad id
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=model.generation_config.pad_token_id)
    return out[0, len(prompt_ids):].tolist()


def hf_prefill_logits(path: Path, prompt_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(path)(torch.tensor([prompt_ids])).logits[0].float()
