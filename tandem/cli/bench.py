"""``tandem bench``: the same workload through each executor mode, measured and compared."""
from __future__ import annotations

import argparse
from pathlib import Path

from tandem.bench.constants import GPU_DEFAULT_MODEL, SIMULATED_DEVICE
from tandem.cli.engine_args import add_engine_args, engine_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark sync vs async batching on random prompts")
    add_engine_args(p, default_model=None, skip=("async_batching",))
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--prompt-len", default="256", help="prompt tokens: N, or MIN:MAX drawn uniformly (seeded)")
    p.add_argument("--max-tokens", default="1024", help="new tokens per request: N, or MIN:MAX (seeded)")
    p.add_argument("--request-rate", type=float, default=None,
                   help="requests per second, Poisson arrivals (default: all requests at once)")
    p.add_argument("--logprobs", type=int, default=None, help="every request asks for logprobs with this many "
                   "alternatives per token (0-20)")
    p.add_argument("--shared-prefix-len", type=int, default=0,
                   help="every prompt starts with the same N random tokens, e.g. a system prompt (default: 0)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="every request's presence penalty")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="every request's frequency penalty")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="every request's repetition penalty")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--structured-output", choices=("json",), default=None,
                   help="every request's output follows a fixed JSON schema (grammar masks at every token)")
    p.add_argument("--repeat-span", type=int, default=0,
                   help="every prompt repeats its first N tokens to its length: text n-gram speculation can "
                        "look up (default: 0, random prompts)")
    p.add_argument("--workload-seed", type=int, default=0)
    p.add_argument("--modes", default="sync,async", help="comma-separated: sync, async")
    p.add_argument("--compare-hf", action="store_true", help="also run transformers' generate_batch as anchor")
    p.add_argument("--hf-modes", default=None, help="comma-separated transformers modes (default: all that apply)")
    p.add_argument("--json", type=Path, default=None, help="write every figure to this JSON file")
    p.add_argument("--timeline", type=Path, default=None, help="PNG of host and GPU lanes, sync above async")
    p.add_argument("--trace", type=Path, default=None, help="Chrome trace JSON (open in Perfetto)")
    p.add_argument("--timeline-steps", type=int, default=8)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--runs", type=int, default=None,
                   help="rounds of every mode, figures given as median [min-max] (default: 1 on a GPU; on a CPU up "
                        "to 5 while a round is fast, and 5 against the simulated device)")
    p.add_argument("--simulated-device", choices=SIMULATED_DEVICE, default="auto",
                   help="also run the host loop against a device taking an H100's measured step times: auto (on a "
                        "CPU, where the real run cannot show the overlap), on, only (no model computed), off")
    p.add_argument("--host-only", action="store_true",
                   help="measure the host loop alone (a device that returns at once) at --host-batch-sizes; "
                        "with a MIN:MAX length, over --num-requests of real traffic (tail per phase)")
    p.add_argument("--host-batch-sizes", default="64,256,1024", help="with --host-only: sequences per step")
    p.set_defaults(func=run)


def default_bench_model() -> str:
    import torch

    return GPU_DEFAULT_MODEL if torch.cuda.is_available() else "random:tiny"


def _default_runs(options: dict) -> int | None:
    """1 on a GPU (its runs are steady); None on a CPU: as many of 5 as are fast enough."""
    import torch

    on_gpu = torch.cuda.is_available() and not str(options.get("device") or "").startswith("cpu")
    return 1 if on_gpu else None


def run(args: argparse.Namespace) -> int:
    if args.host_only:
        if args.runs is not None or args.simulated_device != "auto":
            raise ValueError("--runs and --simulated-device do not apply to --host-only (one pass, no device)")
        return _host_only(args)
    from tandem.bench.api import bench

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    options = engine_options(args, skip=("async_batching",))
    runs = args.runs if args.runs is not None else _default_runs(options)
    bench(args.model or default_bench_model(), modes=modes, num_requests=args.num_requests,
          prompt_len=args.prompt_len, max_tokens=args.max_tokens, temperature=args.temperature,
          workload_seed=args.workload_seed, request_rate=args.request_rate, logprobs=args.logprobs,
          shared_prefix_len=args.shared_prefix_len, presence_penalty=args.presence_penalty,
          frequency_penalty=args.frequency_penalty, repetition_penalty=args.repetition_penalty,
          structured_output=args.structured_output, repeat_span=args.repeat_span, compare_hf=args.compare_hf,
          hf_modes=args.hf_modes.split(",") if args.hf_modes else None, json_path=args.json,
          timeline=args.timeline, trace=args.trace, timeline_steps=args.timeline_steps, progress=args.progress,
          runs=runs, simulated_device=args.simulated_device, simulated_runs=args.runs or 5, **options)
    return 0


def _host_only(args: argparse.Namespace) -> int:
    from tandem.bench.host_only import host_only
    from tandem.bench.workload import LengthRange, Workload

    prompt, new = LengthRange.parse(args.prompt_len), LengthRange.parse(args.max_tokens)
    options = engine_options(args, skip=("async_batching", "max_num_seqs"))
    options["max_model_len"] = options.get("max_model_len") or prompt.hi + new.hi
    sampling = dict(temperature=args.temperature, logprobs=args.logprobs, shared_prefix_len=args.shared_prefix_len,
                    presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                    repetition_penalty=args.repetition_penalty, structured_output=args.structured_output,
                    repeat_span=args.repeat_span)
    if not (prompt.fixed and new.fixed):  # real traffic: --num-requests of these lengths, --max-num-seqs at once
        from tandem.bench.host_traffic import host_traffic

        w = Workload(args.num_requests, prompt, new, seed=args.workload_seed, **sampling)
        host_traffic(args.model or "random:llama3.2-1b", w, max_num_seqs=args.max_num_seqs, **options)
        return 0
    host_only(args.model or "random:llama3.2-1b", [int(b) for b in args.host_batch_sizes.split(",")], prompt.hi,
              new.hi, sampling, **options)
    return 0
