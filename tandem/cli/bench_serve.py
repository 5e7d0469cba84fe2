"""``tandem bench-serve``: concurrent streaming clients against a running ``tandem serve``."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-serve", help="benchmark a running server with concurrent streaming clients")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    p.add_argument("--num-clients", type=int, default=8, help="concurrent streaming clients")
    p.add_argument("--num-requests", type=int, default=None,
                   help="requests in all (default: one per client, all in flight at once as in `tandem bench`)")
    p.add_argument("--prompt-len", type=int, default=256, help="random token-id prompt length")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens generated per request (EOS ignored)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0, help="prompts (the same as `tandem bench --workload-seed`)")
    p.add_argument("--model", default=None, help="served model name (default: the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the unmeasured first round (the same requests with 16-token outputs)")
    p.add_argument("--json", type=Path, default=None, help="write every figure to this JSON file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tandem.server.bench import BenchServeConfig, bench_serve

    cfg = BenchServeConfig(args.url, args.num_clients, args.num_requests, args.prompt_len, args.max_tokens,
                           args.temperature, args.seed, args.model, args.api_key, args.warmup)
    report = bench_serve(cfg, args.json)
    return 0 if report["num_errors"] == 0 else 1
