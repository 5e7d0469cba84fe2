"""Engine options as command-line flags, derived from ``EngineConfig`` (the one list), and the model
given vLLM's way too: ``tandem serve MODEL`` as well as ``--model MODEL``."""
from __future__ import annotations

import argparse
from typing import Any

from tandem.cli.options import add_fields
from tandem.config import option_fields

MODEL_TAG = "model_tag"  # the positional MODEL's dest; ``merge_model`` folds it into ``args.model``


def add_engine_args(parser: argparse.ArgumentParser, default_model: str | None = "random:tiny",
                    skip: tuple[str, ...] = ()) -> None:
    parser.add_argument(MODEL_TAG, nargs="?", metavar="MODEL", default=None,
                        help="the model, as --model (vLLM's positional form)")
    parser.add_argument("--config", default=None, metavar="FILE.yaml",
                        help="read options from a YAML file: keys are the long option names (max-model-len or "
                             "max_model_len); options on the command line win")
    parser.set_defaults(model_default=default_model)
    group = parser.add_argument_group("engine options")
    add_fields(group, [f for f in option_fields() if f.name not in skip], {"model": default_model})


def merge_model(args: argparse.Namespace) -> None:
    """``args.model`` from the positional MODEL or ``--model``; both, and different, is an error."""
    tag = getattr(args, MODEL_TAG, None)
    if tag is None:
        return
    if args.model not in (None, args.model_default, tag):
        raise ValueError(f"the model is given twice, as {tag!r} and --model {args.model!r}")
    args.model = tag


def engine_options(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The engine options (all but ``model``) parsed by ``add_engine_args``."""
    return {f.name: getattr(args, f.name) for f in option_fields()
            if f.name != "model" and f.name not in skip}
