"""Command line: ``tandem generate|bench|serve|bench-serve``."""
from __future__ import annotations

import argparse
import logging
import sys

from tandem.cli import bench, bench_serve, generate, serve
from tandem.cli.config_file import config_defaults
from tandem.cli.engine_args import merge_model

LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
              "critical": logging.CRITICAL}


def _add_logging_args(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="log at INFO (start-up "
                        "decisions: device, dtype, max_model_len, KV cache, graphs)")
    parser.add_argument("--log-level", choices=list(LOG_LEVELS), default=default,
                        help="log level (default: warning; info with -v)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description=__doc__)
    _add_logging_args(parser, None)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (generate, bench, serve, bench_serve):
        command.add_parser(sub)
    for p in sub.choices.values():  # `tandem serve ... -v` as well as `tandem -v serve ...`
        _add_logging_args(p, argparse.SUPPRESS)  # SUPPRESS: an absent flag keeps the top level's value
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse, with a subcommand's ``--config FILE.yaml`` as its defaults (the command line wins)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        sub = _subparsers(parser)[args.command]
        sub.set_defaults(**config_defaults(sub, args.config))
        args = parser.parse_args(argv)
    if hasattr(args, "model"):
        merge_model(args)
    args.log_level = LOG_LEVELS[args.log_level] if args.log_level else (
        logging.INFO if args.verbose else logging.WARNING)
    return args


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    return action.choices


def main(argv: list[str] | None = None) -> int:
    from tandem.parallel.env import check_world_matches, is_follower_process

    if is_follower_process():  # torchrun started every rank with this command: rank 0 runs it, the rest serve it
        from tandem.parallel.follower import main as follower_main

        return follower_main()
    try:
        args = parse(argv)
        logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
        if args.command in ("generate", "bench", "serve"):
            check_world_matches(args.tensor_parallel_size)
        return args.func(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as exc:
        print(f"tandem: error: {exc}", file=sys.stderr)
        return 2
