"""``tandem generate``: complete a few prompts from the command line. A sampling flag left out takes
the request default of the Python API and the server: generation_config.json's under
``--generation-config auto``, else SamplingParams' (temperature 1.0, max_tokens 16, as vLLM)."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from tandem.cli.engine_args import add_engine_args, engine_options

_DEFAULT = "default: the model's generation_config.json, else {}"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate completions for prompts")
    add_engine_args(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message of the chat template")
    p.add_argument("--max-tokens", type=int, default=None, help=_DEFAULT.format(16))
    p.add_argument("--temperature", type=float, default=None, help=_DEFAULT.format("1.0; 0 = greedy"))
    p.add_argument("--top-p", type=float, default=None, help=_DEFAULT.format("1.0"))
    p.add_argument("--top-k", type=int, default=None, help=_DEFAULT.format("0 (off)"))
    p.add_argument("--min-p", type=float, default=None, help=_DEFAULT.format("0.0"))
    p.add_argument("--repetition-penalty", type=float, default=None, help=_DEFAULT.format("1.0"))
    p.add_argument("--sampling-seed", type=int, default=None)
    p.add_argument("--stop", action="append")
    p.add_argument("--ignore-eos", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tandem import LLM, SamplingParams

    given = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                 min_p=args.min_p, repetition_penalty=args.repetition_penalty)
    given = {k: v for k, v in given.items() if v is not None}
    SamplingParams(**given)  # a bad flag fails before the model loads
    llm = LLM(args.model, **engine_options(args))
    params = dataclasses.replace(llm.get_default_sampling_params(), seed=args.sampling_seed, stop=args.stop or None,
                                 ignore_eos=args.ignore_eos, **given)
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
