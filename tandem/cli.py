"""Command line: ``tandem generate|bench|serve``."""
from __future__ import annotations

import argparse
import logging
import sys


def add_engine_args(p: argparse.ArgumentParser, default_model: str | None = "random:tiny") -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=default_model,
                   help="local Hugging Face checkpoint folder, or random:<tiny|qwen3-0.6b|llama3.2-1b|llama3-8b> "
                        f"(default: {default_model or 'random:llama3.2-1b on GPU, random:tiny on CPU'})")
    g.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=8192)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--kv-cache-tokens", type=int, default=None, help="KV cache size in tokens (default: CPU 32768, "
                   "GPU: what fits)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--async-batching", action=argparse.BooleanOptionalAction, default=True,
                   help="prepare step N+1 on the CPU while the device runs step N (default: on)")
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                block_size=args.block_size, gpu_memory_utilization=args.gpu_memory_utilization,
                kv_cache_tokens=args.kv_cache_tokens, seed=args.seed, async_batching=args.async_batching,
                enforce_eager=args.enforce_eager)


def _generate(args: argparse.Namespace) -> int:
    from tandem import LLM, SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, min_p=args.min_p, seed=args.sampling_seed, stop=args.stop or None,
                            ignore_eos=args.ignore_eos)
    llm = LLM(args.model, **engine_kwargs(args))
    prompts = args.prompt or ["Hello, my name is"]
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    else:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    for out in outputs:
        completion = out.outputs[0]
        print(completion.text if llm.tokenizer is not None else completion.token_ids)
        print(f"[{len(completion.token_ids)} tokens, finish_reason={completion.finish_reason}]", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    raise NotImplementedError("`tandem serve` (the OpenAI-compatible server) is not implemented yet")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate completions for prompts")
    add_engine_args(gen)
    gen.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message of the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.add_argument("--stop", action="append")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.set_defaults(func=_generate)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (not implemented yet)")
    add_engine_args(serve)
    serve.set_defaults(func=_serve)

    from tandem.bench.cli import add_bench_parser

    add_bench_parser(sub)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as exc:
        print(f"tandem: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
