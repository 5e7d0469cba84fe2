"""``tandem serve``: the OpenAI-compatible HTTP server (``tandem.server``). Its flags are the engine's
options (``EngineConfig``) and the server's (``ServeOptions``): two declared lists, no flag here."""
from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from tandem.cli.engine_args import add_engine_args, engine_options
from tandem.cli.options import add_fields, cli_fields, from_namespace
from tandem.server.options import API_KEY_ENV, ServeOptions

if TYPE_CHECKING:
    from tandem.config import EngineConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    add_engine_args(p, default_model=None)
    add_fields(p.add_argument_group("server options"), cli_fields(ServeOptions))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tandem.server.launch import serve

    return serve(*configure(args))


def configure(args: argparse.Namespace) -> tuple[EngineConfig, ServeOptions]:
    """The engine's and the server's options from parsed ``tandem serve`` flags (also Ray Serve's
    ``build_app``, tandem.integrations.ray)."""
    from tandem.config import EngineConfig

    if not args.model:
        raise ValueError("tandem serve needs --model or a positional MODEL (a checkpoint folder, a cached Hugging "
                         "Face id or random:<preset>)")
    options = from_namespace(ServeOptions, args, log_level=args.log_level)
    if options.api_key is None:  # the flag wins over the variable
        options.api_key = os.environ.get(API_KEY_ENV) or None
    return EngineConfig.from_options(args.model, **engine_options(args)), options
