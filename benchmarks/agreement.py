"""Greedy agreement of a quantized model with its bf16 original (issue 25's sanity bound: FP8 weights
agree with bf16 on >= 90% of the first 64 greedy tokens of each request).

Usage: python3 scripts/gpu_checks.py agreement      (the 8B shape: random:llama3-8b, 32 x (256 + 64))
       python3 scripts/gpu_checks.py agreement_trained  (benchmarks/trained_tiny.py's model, 32 x (32 + 64))
       python3 benchmarks/agreement.py MODEL [--quantization fp8] [--kv-cache-dtype fp8] [--requests N]
MODEL may be a folder from scripts/trained_tiny.py: its marker file makes the prompts walks of the
corpus it learned (random ids are out of its distribution).

Both models have the same weights (random presets are seeded per tensor), so any difference is the
quantization's. Two figures:
  free-running   position by position, the share of the first T tokens equal to bf16's. Once one
                 token differs the two continue from different texts, so a near-tie early in a
                 request costs every later position: on random weights, whose logits are flat, this
                 understates how close the models are.
  teacher-forced bf16's tokens appended to the prompt and scored by the quantized model
                 (prompt_logprobs): the share of positions where bf16's token is the quantized
                 model's most likely one. Each position is judged on the same text, so one near-tie
                 costs one position.
Both are recorded; neither is a kernel test (the kernels are checked against their references)."""
from __future__ import annotations

import argparse
import random
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MIN_AGREEMENT = 0.90


@dataclass
class Agreement:
    free_running: float
    teacher_forced: float
    positions: int

    def line(self, what: str, base: str = "bf16") -> str:
        return (f"agreement of {what} with {base} over {self.positions} positions: free-running "
                f"{self.free_running:.1%}, teacher-forced {self.teacher_forced:.1%}")


def _prompts(model: str, n: int, length: int, vocab: int, seed: int = 1234) -> list[list[int]]:
    """Seeded prompts: walks of the corpus a ``trained_tiny`` checkpoint learned (random ids are out of
    its distribution and leave even a trained model unsure), else random token ids."""
    corpus = _corpus(model)
    if corpus is not None:
        return corpus.samples(random.Random(seed), n, length)
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (length,), generator=gen).tolist() for _ in range(n)]


def _corpus(model: str):
    """The corpus of a checkpoint folder made by benchmarks/trained_tiny.py (its marker file), else None."""
    from benchmarks.trained_tiny import load_corpus

    return load_corpus(model) if Path(model).is_dir() else None


def _llm(model: str, **options):
    from tandem import LLM

    return LLM(model, **{"dtype": "bfloat16", **options})


@dataclass
class Reference:
    """The bf16 model's greedy tokens for its prompts: what each quantized run is compared with."""

    prompts: list[list[int]]
    tokens: list[list[int]]


def reference(model: str, base: dict, requests: int = 32, prompt_len: int = 256, tokens: int = 64,
              seed: int = 1234) -> Reference:
    """``model`` loaded with ``base`` (bf16 unless it names a dtype): greedy ``tokens`` for each of
    ``requests`` prompts drawn with ``seed``."""
    from tandem import SamplingParams

    llm = _llm(model, **base)
    prompts = _prompts(model, requests, prompt_len, llm.engine.model_config.vocab_size, seed)
    greedy = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    out = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    llm.engine.shutdown()
    return Reference(prompts, out)


def measure(model: str, options: dict, ref: Reference) -> Agreement:
    """Agreement with ``ref`` of ``model`` loaded with ``options``."""
    from tandem import SamplingParams

    llm = _llm(model, **options)
    greedy = SamplingParams(temperature=0, max_tokens=len(ref.tokens[0]), ignore_eos=True)
    free = [o.outputs[0].token_ids for o in llm.generate(ref.prompts, greedy, use_tqdm=False)]
    scored = llm.generate([p + r[:-1] for p, r in zip(ref.prompts, ref.tokens)],
                          SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    llm.engine.shutdown()
    same = sum(a == b for r, f in zip(ref.tokens, free) for a, b in zip(r, f))
    # bf16's token i sits at prompt position len(p) + i; its last one is the scored run's own draw
    top = sum(o.prompt_logprobs[len(p) + i][tok].rank == 1 for o, p, r in zip(scored, ref.prompts, ref.tokens)
              for i, tok in enumerate(r[:-1]))
    top += sum(o.outputs[0].token_ids[0] == r[-1] for o, r in zip(scored, ref.tokens))
    positions = sum(len(r) for r in ref.tokens)
    return Agreement(same / positions, top / positions, positions)


def _compare(model: str, common: dict, ref: Reference) -> Agreement:
    """bf16 at another batch size (its GEMMs tile and split differently, so it rounds differently: how
    far mere rounding moves these weights' greedy tokens), FP8 and 4-bit (W4A16) against ``ref``, each
    printed; FP8's figures returned."""
    control = measure(model, dict(common, max_num_seqs=8), ref)
    print(control.line("bf16 at max_num_seqs 8 (rounding alone)"))
    fp8 = measure(model, dict(common, quantization="fp8"), ref)
    print(fp8.line("--quantization fp8"))
    int4 = measure(model, dict(common, quantization="int4"), ref)
    print(int4.line("--quantization int4"))
    return fp8


def _verdict(what: str, fp8: Agreement) -> bool:
    ok = fp8.free_running >= MIN_AGREEMENT
    print(f"{what}: FP8 free-running {'>=' if ok else '<'} {MIN_AGREEMENT:.0%}")
    return ok


def check() -> bool:
    """The 8B shape (random weights) in FP8 and in 4-bit against bf16 on the GPU, beside the bf16
    control. Passes when FP8's free-running agreement reaches the issue's bound (every figure recorded
    either way)."""
    model = "random:llama3-8b"
    common = dict(max_num_seqs=32, max_model_len=512)
    return _verdict("agreement", _compare(model, common, reference(model, common)))


def check_trained() -> bool:
    """The same on benchmarks/trained_tiny.py's model, trained here on the GPU (seconds): confident
    greedy tokens, so the figures are the quantization's and not near-ties'. 32 corpus walks of 32
    bytes, 64 tokens each (the model was trained on 96-byte walks)."""
    import tempfile

    import torch

    from benchmarks.trained_tiny import train

    with tempfile.TemporaryDirectory() as tmp:
        model = str(train(tmp, device="cuda" if torch.cuda.is_available() else "cpu"))
        common = dict(max_num_seqs=32, max_model_len=128)
        ref = reference(model, common, requests=32, prompt_len=32, tokens=64)
        return _verdict("agreement (trained tiny model)", _compare(model, common, ref))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a preset, or a checkpoint folder (one from scripts/trained_tiny.py: "
                                 "the prompts are walks of its corpus)")
    p.add_argument("--quantization", default="fp8")
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--dtype", default="bfloat16", help="of both models (float32 on a CPU)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=None,
                   help="default 256; 32 for a trained_tiny folder (with 64 tokens, the 96 bytes it was trained on)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    if args.prompt_len is None:
        args.prompt_len = 32 if _corpus(args.model) is not None else 256
    common = dict(device=args.device, dtype=args.dtype, max_model_len=args.prompt_len + args.tokens + 16)
    ref = reference(args.model, common, args.requests, args.prompt_len, args.tokens)
    result = measure(args.model, dict(common, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype), ref)
    print(result.line(f"--quantization {args.quantization} --kv-cache-dtype {args.kv_cache_dtype}", args.dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
