"""``tandem serve``: the OpenAI-compatible HTTP server (``tandem.server``)."""
from __future__ import annotations

import argparse
import logging

from tandem.cli.engine_args import add_engine_args, engine_options
from tandem.server.defaults import DEFAULT_CORE_HEARTBEAT_TIMEOUT_S, DEFAULT_CORE_TIMEOUT_S, DEFAULT_MAX_REQUEST_BYTES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    add_engine_args(p, default_model=None)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="(default: 8000; 0 = a free port, printed at start)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on the /v1 routes")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients use (default: the --model value); the first is reported")
    p.add_argument("--max-num-waiting", type=int, default=None,
                   help="refuse requests (429) while more than this many would wait for a place in the batch")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help=f"refuse larger request bodies (413) (default: {DEFAULT_MAX_REQUEST_BYTES})")
    p.add_argument("--allowed-origins", nargs="+", default=None,
                   help="enable CORS for these browser origins ('*': any); off by default")
    p.add_argument("--core-timeout", type=float, default=DEFAULT_CORE_TIMEOUT_S,
                   help="seconds the engine core may stay silent while requests wait before it is declared "
                        f"dead (503, exit 1) (default: {DEFAULT_CORE_TIMEOUT_S:.0f}; 0: never)")
    p.add_argument("--core-heartbeat-timeout", type=float, default=DEFAULT_CORE_HEARTBEAT_TIMEOUT_S,
                   help="seconds without the engine core's heartbeat (its process stopped) before /health answers "
                        f"503 until it runs again (default: {DEFAULT_CORE_HEARTBEAT_TIMEOUT_S:g}; 0: never)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tandem.config import EngineConfig
    from tandem.server.launch import ServeOptions, serve

    if not args.model:
        raise ValueError("tandem serve needs --model (a checkpoint folder or random:<preset>)")
    if args.max_num_waiting is not None and args.max_num_waiting < 0:
        raise ValueError(f"--max-num-waiting must be >= 0, got {args.max_num_waiting}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_request_bytes < 1:
        raise ValueError(f"--max-request-bytes must be >= 1, got {args.max_request_bytes}")
    if not args.core_timeout >= 0:  # also refuses NaN
        raise ValueError(f"--core-timeout must be >= 0, got {args.core_timeout}")
    if not args.core_heartbeat_timeout >= 0:
        raise ValueError(f"--core-heartbeat-timeout must be >= 0, got {args.core_heartbeat_timeout}")
    config = EngineConfig.from_options(args.model, **engine_options(args))
    level = logging.INFO if args.verbose else logging.WARNING
    options = ServeOptions(args.host, args.port, args.api_key, args.served_model_name, args.max_num_waiting, level,
                           args.max_request_bytes, args.allowed_origins, args.core_timeout,
                           core_heartbeat_timeout_s=args.core_heartbeat_timeout)
    return serve(config, options)
