"""Ray Serve: tandem's OpenAI server as a Serve deployment, one engine per replica.

    serve run tandem.integrations.ray:build_app model=/models/llama-3-8b tensor-parallel-size=2 num-replicas=4
    serve run examples/ray/serve_config.yaml

Each replica starts what ``tandem serve`` starts (an engine-core process, its tensor-parallel ranks,
the API side that tokenizes and streams) and Ray Serve's HTTP proxy calls the same FastAPI app, so
every route, flag and error is the server's (docs/serving.md). Ray spreads requests over the
replicas and restarts one whose engine core died (``check_health``).

``build_app`` takes ``tandem serve``'s flags as keys (``max-num-seqs`` or ``max_num_seqs``) plus the
deployment's own: ``num_replicas`` (default 1), ``num_gpus`` per replica (default
``tensor_parallel_size`` x ``data_parallel_size``, 0 with ``device=cpu``), ``num_cpus`` (default 1),
``max_ongoing_requests`` (default 256), ``name`` (default ``tandem``). The flags that belong to an
HTTP listener (``host``, ``port``, ``max_header_bytes``, ``uvicorn_log_level``,
``disable_log_requests``) are refused: Ray Serve's proxy listens (its ``http_options`` say where) and
logs requests; ``request_read_timeout`` still bounds reading a body. Every worker node needs tandem
installed (or a ``runtime_env`` that installs it)."""
from __future__ import annotations

import argparse
import contextlib
import io
from collections.abc import Callable
from typing import Any

try:
    from ray import serve
except ImportError as exc:  # the optional extra
    raise ImportError("tandem.integrations.ray needs Ray Serve: pip install 'tandem-llm[ray]' "
                      "(or 'ray[serve]')") from exc

from tandem.config import EngineConfig
from tandem.server.options import ServeOptions

DEPLOYMENT_DEFAULTS: dict[str, Any] = {"num_replicas": 1, "num_gpus": None, "num_cpus": 1,
                                       "max_ongoing_requests": 256, "name": "tandem"}
HTTP_ONLY = ("host", "port", "max_header_bytes", "uvicorn_log_level", "disable_log_requests")


class TandemReplica:
    """One replica. Its app (engine core started, routes, lifespan) comes from the builder
    ``serve.ingress`` is given, which Ray calls in the replica once this constructor has run."""

    def check_health(self) -> None:
        """Ray calls this periodically: an engine core that died or stopped fails the replica, which
        Ray then replaces."""
        problem = self.app.state.tandem_client.health_problem()  # self.app: Ray's ASGI wrapper
        if problem is not None:
            raise RuntimeError(f"tandem: {problem}")


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application ``serve run tandem.integrations.ray:build_app key=value ...`` (or a Serve
    config's ``import_path`` + ``args``) deploys."""
    args = {key.replace("-", "_"): value for key, value in args.items()}
    deployment = {key: args.pop(key, default) for key, default in DEPLOYMENT_DEFAULTS.items()}
    refused = sorted(set(args) & set(HTTP_ONLY))
    if refused:
        raise ValueError(f"{refused} configure tandem serve's own HTTP listener; under Ray Serve its proxy "
                         "listens: set http_options (host, port) in the Serve config instead")
    config, options = parse_serve_args(args)
    return tandem_deployment(config, options, **deployment)


def tandem_deployment(config: EngineConfig, options: ServeOptions, num_replicas: int | str = 1,
                      num_gpus: float | None = None, num_cpus: float = 1, max_ongoing_requests: int = 256,
                      name: str = "tandem") -> serve.Application:
    """The deployment for already-built options (``EngineConfig``, ``ServeOptions``)."""
    if num_gpus is None:
        on_cpu = (config.device or "").startswith("cpu")
        num_gpus = 0 if on_cpu else config.tensor_parallel_size * options.data_parallel_size
    replicas = num_replicas if num_replicas == "auto" else int(num_replicas)
    ingress = serve.ingress(_app_builder(config, options))(TandemReplica)
    return serve.deployment(ingress, name=name, num_replicas=replicas, max_ongoing_requests=int(max_ongoing_requests),
                            ray_actor_options={"num_gpus": float(num_gpus), "num_cpus": float(num_cpus)}).bind()


def _app_builder(config: EngineConfig, options: ServeOptions) -> Callable[[], Any]:
    """What Ray calls in each replica (a plain function, pickled with the options it closes over)."""

    def build() -> Any:
        from tandem.server.launch import server_app, start_client

        client = start_client(config, options)  # blocks until the engine core is ready
        app = server_app(client, config, options)
        app.state.tandem_client = client
        return app

    return build


def parse_serve_args(args: dict[str, Any]) -> tuple[EngineConfig, ServeOptions]:
    """``tandem serve``'s flags given as a dict (strings from ``serve run``, or typed values from a
    YAML config) -> the engine's and the server's options, checked as the command line checks them."""
    from tandem.cli import build_parser, parse
    from tandem.cli.serve import configure

    actions = _serve_actions(build_parser())
    argv = ["serve"]
    for key, value in args.items():
        key = key.replace("-", "_")
        action = actions.get(key)
        if action is None:
            raise ValueError(f"unknown option {key!r}: neither a tandem serve flag nor one of the deployment's "
                             f"{sorted(DEPLOYMENT_DEFAULTS)}")
        argv += _flag_values(key, action, value)
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):  # argparse prints its message, then exits
            args = parse(argv)
    except SystemExit as exc:
        raise ValueError(errors.getvalue().strip().splitlines()[-1] if errors.getvalue() else str(exc)) from None
    return configure(args)


def _serve_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The ``serve`` subcommand's flags by their dest (``max_num_seqs``)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    serve_parser = sub.choices["serve"]
    return {a.dest: a for a in serve_parser._actions if a.option_strings}  # noqa: SLF001


def _flag_values(key: str, action: argparse.Action, value: Any) -> list[str]:
    flag = next(s for s in action.option_strings if s.startswith("--") and not s.startswith("--no-"))
    if action.nargs == 0:  # a switch: true / false, as a bool or a string
        on = _truth(key, value)
        if on:
            return [flag]
        return ["--no-" + flag[2:]] if isinstance(action, argparse.BooleanOptionalAction) else []
    if value is None:
        return []
    if action.nargs == "+":
        values = value if isinstance(value, list) else str(value).split(",")
        return [flag, *map(str, values)]
    return [flag, str(value)]


def _truth(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on", ""):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"{key} is a switch: true or false, got {value!r}")


__all__ = ["TandemReplica", "build_app", "parse_serve_args", "tandem_deployment"]
