"""Command line: ``tandem generate|bench|serve|bench-serve``."""
from __future__ import annotations

import argparse
import logging
import sys

from tandem.cli import bench, bench_serve, generate, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    generate.add_parser(sub)
    bench.add_parser(sub)
    serve.add_parser(sub)
    bench_serve.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from tandem.parallel.env import check_world_matches, is_follower_process

    if is_follower_process():  # torchrun started every rank with this command: rank 0 runs it, the rest serve it
        from tandem.parallel.follower import main as follower_main

        return follower_main()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command in ("generate", "bench", "serve"):
            check_world_matches(args.tensor_parallel_size)
        return args.func(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as exc:
        print(f"tandem: error: {exc}", file=sys.stderr)
        return 2
