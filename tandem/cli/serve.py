"""``tandem serve``: the OpenAI-compatible HTTP server (``tandem.server``)."""
from __future__ import annotations

import argparse
import logging
import os

from tandem.cli.engine_args import add_engine_args, engine_options
from tandem.server.defaults import (DEFAULT_CORE_HEARTBEAT_TIMEOUT_S, DEFAULT_CORE_TIMEOUT_S, DEFAULT_MAX_HEADER_BYTES,
                                   DEFAULT_MAX_N, DEFAULT_MAX_PROMPTS_PER_REQUEST, DEFAULT_MAX_REQUEST_BYTES,
                                   DEFAULT_MAX_SEQS_PER_REQUEST, DEFAULT_MIN_MAX_NUM_WAITING,
                                   DEFAULT_REQUEST_READ_TIMEOUT_S, DEFAULT_WAITING_BATCHES)

API_KEY_ENV = "TANDEM_API_KEY"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    add_engine_args(p, default_model=None)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="(default: 8000; 0 = a free port, printed at start)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on the /v1 routes (default: ${API_KEY_ENV} if set; "
                        "the variable keeps the key out of the process list)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients use (default: the --model value); the first is reported")
    p.add_argument("--max-num-waiting", type=int, default=None,
                   help="refuse requests (429) while more than this many would wait for a place in the batch "
                        f"(default: {DEFAULT_WAITING_BATCHES} x --max-num-seqs, at least "
                        f"{DEFAULT_MIN_MAX_NUM_WAITING})")
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
    _add_limit_args(p)
    _add_chat_parsing_args(p)
    p.set_defaults(func=run)


def _add_chat_parsing_args(p: argparse.ArgumentParser) -> None:
    """How chat outputs are read: tool calls and reasoning (vLLM's flags and parser names)."""
    from tandem.server.reasoning.registry import REASONING_PARSERS
    from tandem.server.tools.registry import TOOL_PARSERS

    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='serve tool_choice "auto" (the default when a request has tools): the model decides '
                        "whether to call, and its calls are read with --tool-call-parser")
    p.add_argument("--tool-call-parser", choices=sorted(TOOL_PARSERS), default=None,
                   help="the model family's tool-call format: hermes (Hermes, Qwen 2.5 and 3), llama3_json "
                        "(Llama 3.x), mistral")
    p.add_argument("--reasoning-parser", choices=sorted(REASONING_PARSERS), default=None,
                   help="return a <think> model's reasoning as reasoning_content, apart from content: "
                        "deepseek_r1 (R1 and its distills), qwen3")


def _add_limit_args(p: argparse.ArgumentParser) -> None:
    """What one request may ask for (400 beyond), and how long and large its head and body may be."""
    p.add_argument("--max-prompts-per-request", type=int, default=DEFAULT_MAX_PROMPTS_PER_REQUEST,
                   help=f"most prompts in one completions request (default: {DEFAULT_MAX_PROMPTS_PER_REQUEST})")
    p.add_argument("--max-n", type=int, default=DEFAULT_MAX_N,
                   help=f"most choices (n) per prompt, at most 1024 (default: {DEFAULT_MAX_N}, as OpenAI)")
    p.add_argument("--max-seqs-per-request", type=int, default=DEFAULT_MAX_SEQS_PER_REQUEST,
                   help="most sequences (prompts x n) one request may create "
                        f"(default: {DEFAULT_MAX_SEQS_PER_REQUEST})")
    p.add_argument("--default-max-tokens", type=int, default=None,
                   help="max_tokens of a request that gives none (chat, or null on completions): the rest of "
                        "the context, capped at this (default: no cap)")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="accept a chat_template in chat and /tokenize requests (off: a Jinja template from a "
                        "client is code the server runs, sandboxed but unbounded in time)")
    p.add_argument("--max-header-bytes", type=int, default=DEFAULT_MAX_HEADER_BYTES,
                   help=f"refuse larger request lines plus headers (431) (default: {DEFAULT_MAX_HEADER_BYTES})")
    p.add_argument("--request-read-timeout", type=float, default=DEFAULT_REQUEST_READ_TIMEOUT_S,
                   help="seconds a client has to send a request's headers, and again its body, before it gets "
                        f"408 and the connection is closed (default: {DEFAULT_REQUEST_READ_TIMEOUT_S:g})")


def run(args: argparse.Namespace) -> int:
    from tandem.config import EngineConfig
    from tandem.server.chat_output import ChatParsing
    from tandem.server.launch import ServeOptions, serve
    from tandem.server.request_limits import RequestLimits

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
    if args.max_header_bytes < 1024:
        raise ValueError(f"--max-header-bytes must be >= 1024, got {args.max_header_bytes}")
    if not args.request_read_timeout > 0:
        raise ValueError(f"--request-read-timeout must be > 0, got {args.request_read_timeout}")
    limits = RequestLimits(args.max_prompts_per_request, args.max_n, args.max_seqs_per_request,
                           args.default_max_tokens, args.trust_request_chat_template)
    chat_parsing = ChatParsing(args.tool_call_parser, args.enable_auto_tool_choice, args.reasoning_parser)
    chat_parsing.check()
    config = EngineConfig.from_options(args.model, **engine_options(args))
    level = logging.INFO if args.verbose else logging.WARNING
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    options = ServeOptions(args.host, args.port, api_key, args.served_model_name, args.max_num_waiting, level,
                           args.max_request_bytes, args.allowed_origins, args.core_timeout,
                           core_heartbeat_timeout_s=args.core_heartbeat_timeout, limits=limits,
                           max_header_bytes=args.max_header_bytes, request_read_timeout_s=args.request_read_timeout,
                           chat_parsing=chat_parsing)
    return serve(config, options)
