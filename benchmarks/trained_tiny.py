"""A tiny Llama trained on the spot, so that quantization agreement is measured on a model whose greedy
tokens are confident (random presets' logits are so flat that rounding alone reorders them).

Usage: python3 scripts/trained_tiny.py OUT_DIR [--steps N] [--seed S]

The corpus is byte text with a fixed rule: a word list and a successor map over it (both drawn from
``random.Random(seed)``), each sample a walk ``w, next[w], next[next[w]], ...`` starting at a random
word. Only the first word of a walk is chance; every later byte follows from the text before it, so
a trained model's greedy continuation of a corpus prompt has one right answer at each position (no
near-ties between equally likely words for rounding to flip). The model reads bytes (ids 0..255, as
``ByteTokenizer``), and its tokenizer files map each byte to its own id, so text prompts work too.
Every linear's input width is a multiple of 128 (4-bit group 128, FP8 block 128 apply).

The checkpoint directory gets ``MARKER`` (the corpus parameters): ``benchmarks/agreement.py`` draws its
prompts from the same corpus when it finds it."""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MARKER = "trained_tiny.json"
SPECIALS = ["<s>", "</s>", "<pad>"]  # ids 256.. (the bytes keep their own values as ids)
VOCAB = 256 + len(SPECIALS)
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Corpus:
    """The rule the model learns: ``words`` and, for word i, the index of the word that follows it."""

    seed: int
    words: list[str]
    successor: list[int]

    @staticmethod
    def make(seed: int, n_words: int = 32) -> "Corpus":
        rng = random.Random(seed)
        words: list[str] = []
        while len(words) < n_words:  # distinct words of 3-6 letters
            w = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 6)))
            if w not in words:
                words.append(w)
        # one cycle through every word: a walk never gets stuck repeating a short loop
        order = list(range(n_words))
        rng.shuffle(order)
        successor = [0] * n_words
        for a, b in zip(order, order[1:] + order[:1]):
            successor[a] = b
        return Corpus(seed, words, successor)

    def walk(self, start: int, n_bytes: int) -> list[int]:
        """At least ``n_bytes`` bytes of the walk from word ``start`` ("w1 w2 w3 ..."), cut to length."""
        text, i = "", start
        while len(text) < n_bytes:
            text += self.words[i] + " "
            i = self.successor[i]
        return list(text.encode())[:n_bytes]

    def samples(self, rng: random.Random, n: int, n_bytes: int) -> list[list[int]]:
        return [self.walk(rng.randrange(len(self.words)), n_bytes) for _ in range(n)]


@dataclass(frozen=True)
class Shape:
    """The model's size: every linear's in_features a multiple of 128."""

    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 768


def _config(shape: Shape):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.intermediate, max_position_embeddings=512, rms_norm_eps=1e-5,
        bos_token_id=256, eos_token_id=257, pad_token_id=258, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0))


def _byte_tokenizer():
    """Byte-level BPE without merges: byte b is token b (GPT-2's byte-to-character alphabet)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = _bytes_to_unicode()
    vocab = {chars[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   clean_up_tokenization_spaces=False)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (what the ByteLevel pre-tokenizer emits)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


@dataclass(frozen=True)
class Training:
    steps: int = 150
    batch: int = 16
    seq: int = 96
    lr: float = 3e-3
    warmup: int = 20


def _fit(model, corpus: Corpus, t: Training, seed: int) -> float:
    """Adam with warmup then cosine decay; returns the mean loss of the last 10 steps."""
    import math

    import torch

    rng = random.Random(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / t.warmup)
                                              * 0.5 * (1 + math.cos(math.pi * min(s, t.steps) / t.steps)))
    last: list[float] = []
    device = next(model.parameters()).device
    model.train()
    for _ in range(t.steps):
        ids = torch.tensor(corpus.samples(rng, t.batch, t.seq), device=device)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        last = (last + [loss.item()])[-10:]
    model.eval()
    return sum(last) / len(last)


def train(out_dir: str | Path, seed: int = 0, steps: int = Training.steps, shape: Shape = Shape(),
          device: str = "cpu", threads: int | None = None) -> Path:
    """Train the model on ``device`` and save it (float32, tokenizer, ``MARKER``) into ``out_dir``."""
    import os

    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.manual_seed(seed)
    corpus = Corpus.make(seed)
    model = LlamaForCausalLM(_config(shape)).to(device)
    started = time.perf_counter()
    loss = _fit(model, corpus, Training(steps=steps), seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.to("cpu").save_pretrained(out)
    _byte_tokenizer().save_pretrained(out)
    (out / MARKER).write_text(json.dumps(dict(asdict(corpus), steps=steps, final_loss=loss), indent=1) + "\n")
    print(f"trained {steps} steps in {time.perf_counter() - started:.1f} s: final loss {loss:.4f} -> {out}", flush=True)
    return out


def load_corpus(path: str | Path) -> Corpus | None:
    """The corpus a checkpoint from ``train`` was trained on (None for any other checkpoint)."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return None
    d = json.loads(marker.read_text())
    return Corpus(d["seed"], d["words"], d["successor"])


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--steps", type=int, default=Training.steps)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    train(args.out_dir, seed=args.seed, steps=args.steps, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
