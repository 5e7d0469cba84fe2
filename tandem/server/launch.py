"""Start the whole server: bind the port, start the engine core, serve with uvicorn, and shut down.

Shutdown (SIGINT or SIGTERM): the port stops accepting, in-flight requests end at once with an error
(streams get an error event and ``[DONE]``), the core is told to stop and is waited for, and the
process exits 0. If the core dies instead, requests fail the same way and the exit status is 1."""
from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import signal
import socket
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from tandem.config import EngineConfig
from tandem.engine.heap import freeze
from tandem.engine.startup_summary import startup_summary
from tandem.generation_defaults import sampling_defaults
from tandem.server.app import create_app
from tandem.server.client import EngineClient
from tandem.server.defaults import default_max_num_waiting
from tandem.server.dp_api import FollowerPlan, follower_metrics, start_followers
from tandem.server.http_limits import limited_protocol
from tandem.server.metrics import ServerMetrics
from tandem.server.options import ServeOptions
from tandem.server.request_limits import RequestLimits

log = logging.getLogger(__name__)

DEAD_CORE_LINGER_S = 2.0
# ServeOptions: tandem.server.options, the one list
__all__ = ["ServeOptions", "bind", "serve", "server_app", "start_client"]


class _Server(uvicorn.Server):
    """uvicorn's server, which also ends in-flight requests as soon as a signal asks it to stop
    (uvicorn alone would wait for them to finish) and can be stopped when the core dies."""

    def __init__(self, config: uvicorn.Config, client: EngineClient) -> None:
        super().__init__(config)
        self.client = client
        self.exit_code = 0
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.loop is not None:  # we run inside a signal handler: hand over to the loop
            self.loop.call_soon_threadsafe(self.client.begin_shutdown)
        super().handle_exit(sig, frame)

    def core_died(self) -> None:
        """Exit 1, after a moment in which /health answers 503 and clients read their errors."""
        self.exit_code = 1
        if self.loop is None:
            self.should_exit = True
        else:
            self.loop.call_later(DEAD_CORE_LINGER_S, setattr, self, "should_exit", True)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the (slow) engine start so a taken port fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    return sock


def uvicorn_logging(options: ServeOptions) -> dict[str, Any]:
    """uvicorn's log level (--uvicorn-log-level, else ours) and its access log: one line per request at
    --log-level info and below, unless --disable-log-requests."""
    level = options.uvicorn_log_level or ("info" if options.log_level <= logging.INFO else "warning")
    return {"log_level": level, "access_log": options.log_level <= logging.INFO and not options.disable_log_requests}


def start_client(config: EngineConfig, options: ServeOptions, plan: FollowerPlan | None = None) -> EngineClient:
    """Start the engine core (blocking until it is ready) and the API process's client of it; with
    ``plan``, a further API process's client of the cores the first one started."""
    config = config.resolved()  # the processes read local folders only (a cached hub id: its snapshot)
    cores = options.data_parallel_size
    waiting = options.max_num_waiting
    waiting = default_max_num_waiting(config.max_num_seqs * cores) if waiting is None else waiting
    names = options.served_model_name or [config.model]
    metrics = follower_metrics(ServerMetrics(names[0], options.metrics_prefix, cores), options, plan)
    return EngineClient(config, metrics, waiting, options.log_level, options.core_timeout,
                        options.core_heartbeat_timeout, cores, options.api_server_count - 1,
                        None if plan is None else plan.cores, options.stream_interval)


def server_app(client: EngineClient, config: EngineConfig, options: ServeOptions) -> FastAPI:
    """The OpenAI app around ``client`` (its lifespan starts and closes the client): run by ``serve``
    with uvicorn, or by Ray Serve's proxy (``tandem.integrations.ray``)."""
    names = options.served_model_name or [config.model]  # the model as given, not the cache folder it means
    config = config.resolved()
    defaults = sampling_defaults(config.model, config.generation_config)  # --generation-config
    limits = _limits(options, defaults.pop("max_tokens", None))
    return create_app(client, names, config.model, options.api_key, options.max_request_bytes,
                      options.allowed_origins, limits, options.request_read_timeout, options.chat_parsing(), defaults)


def _limits(options: ServeOptions, max_new_tokens: int | None) -> RequestLimits:
    """generation_config.json's max_new_tokens caps requests that give no max_tokens, unless
    --default-max-tokens says otherwise."""
    limits = options.limits()
    if options.default_max_tokens is None and max_new_tokens is not None:
        limits = dataclasses.replace(limits, default_max_tokens=max_new_tokens)
    return limits


def serve(config: EngineConfig, options: ServeOptions) -> int:
    """Run until stopped; returns the exit status."""
    sock = bind(options.host, options.port)
    names = options.served_model_name or [config.model]
    cores = "the engine core" if options.data_parallel_size == 1 else f"{options.data_parallel_size} engine cores"
    print(f"tandem: starting {cores} for {config.model!r} ...", flush=True)
    try:
        start = time.perf_counter()
        client = start_client(config, options)
        summary = startup_summary(client.cores[0].info, time.perf_counter() - start)  # one core's figures
        log.info("%s%s", summary, f" (each of {len(client.cores)} engine cores)" if len(client.cores) > 1 else "")
    except BaseException:
        sock.close()
        raise
    try:
        start_followers(serve_follower, config, options, sock, client)  # --api-server-count > 1
        return _run(client, config, options, sock,
                    f"tandem: serving {names[0]!r} on http://{options.host}:{sock.getsockname()[1]}")
    finally:
        if client.followers is not None:
            client.followers.stop()  # normally done already (lifespan); this covers a failed start
        client.close_channels()
        sock.close()


def serve_follower(config: EngineConfig, options: ServeOptions, sock: socket.socket, plan: FollowerPlan,
                   on_ready: Callable[[], None]) -> int:
    """A further API process (``--api-server-count``, ``dp_api``): the same app on the same socket,
    on the engine cores the first process started."""
    client = start_client(config, options, plan)
    try:
        on_ready()
        return _run(client, config, options, sock, None)
    finally:
        client.close_channels()


def _run(client: EngineClient, config: EngineConfig, options: ServeOptions, sock: socket.socket,
         announce: str | None) -> int:
    app = server_app(client, config, options)
    uv_config = uvicorn.Config(app, **uvicorn_logging(options), timeout_graceful_shutdown=10,
                               http=limited_protocol(options.max_header_bytes, options.request_read_timeout))
    server = _Server(uv_config, client)
    client.on_core_death = server.core_died
    # uvicorn re-raises the signal that stopped it once it is done: make that a no-op, so a
    # requested shutdown exits 0 instead of dying by the signal
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    gc.collect()
    freeze()  # start-up objects leave the collector's view: collections stay short while serving
    if announce:
        print(announce, flush=True)
    server.run(sockets=[sock])
    return server.exit_code or (0 if server.started else 1)
