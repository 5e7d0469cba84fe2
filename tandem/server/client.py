"""The API process's engine: input processing (validate, tokenize), the channels to the engine-core
process(es), output processing (detokenize, stop strings), and one asyncio queue per API request.

One background task per core receives its per-step messages, turns their token deltas into
``RequestOutput``s and puts each on its request's queue; route handlers only read their queue. Every
accepted request ends with its outputs or a ``RequestFailed``: the core died or was declared dead
(503, as for a new request then), the server is shutting down (503), or the core refused it or one
of its steps failed and the core served on (500). How the core's health is judged: ``watchdog``."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import msgspec
import zmq

from tandem.config import EngineConfig
from tandem.engine.limits import check_representable
from tandem.engine.output_processor import OutputProcessor
from tandem.engine.processor import InputProcessor
from tandem.engine.scheduler import StepDeltas
from tandem.engine.sequence import EngineRequest
from tandem.model.sources import load_tokenizer, resolve_model_config
from tandem.server import fault_injection
from tandem.server.channel import CoreDeadError
from tandem.server.dp_api import Followers
from tandem.server.dp_attach import AttachedChannel, CoreAddress
from tandem.server.dp_client import CoreLink, CoreSet, close_all, core_devices, spawn_cores, wait_cores
from tandem.server.errors import APIError, bad_request
from tandem.server.messages import AddRequests, Failed, FinishRequests, Ready, StepUpdate
from tandem.server.request_handle import RequestFailed, RequestHandle
from tandem.server.metrics import ServerMetrics
from tandem.server.watchdog import CoreWatchdog

log = logging.getLogger(__name__)

MAX_MESSAGES_PER_WAKEUP = 64  # steps processed together when this process lags behind the core


@dataclass
class _Route:
    """One engine request (a choice of an API request) while it runs."""

    handle: RequestHandle
    index: int  # its choice index in the API request
    arrival: float
    core: CoreLink  # the engine core it runs on
    prompt_tokens: int
    num_tokens: int = 0  # generated so far
    first_token: float | None = None
    last_token: float = 0.0


class EngineClient:
    """Starts the engine cores (blocking until they are ready), then serves requests from the event
    loop once ``start()`` ran there. One core, or ``data_parallel_size`` of them (``dp_client``):
    each engine request goes to one core (``dp_router``) and stays there."""

    def __init__(self, config: EngineConfig, metrics: ServerMetrics, max_num_waiting: int | None = None,
                 log_level: int = logging.WARNING, core_timeout_s: float = 0.0,
                 core_heartbeat_timeout_s: float = 0.0, data_parallel_size: int = 1, api_peers: int = 0,
                 attach: list[CoreAddress] | None = None, stream_interval: int = 1) -> None:
        """``api_peers``: further API processes the cores will serve too (``dp_api``); ``attach``: this
        is one of those, on the cores another API process started; ``stream_interval``: new tokens a
        running request collects before its handler is woken again (``--stream-interval``)."""
        self.model_config = resolve_model_config(config.model)  # a bad name fails before anything starts
        if data_parallel_size < 1:
            raise ValueError(f"--data-parallel-size must be >= 1, not {data_parallel_size}")
        core_devices(config, data_parallel_size)  # a device setting that cannot split fails before any spawn
        # the cores load weights while we load the tokenizer
        channels = (spawn_cores(config, data_parallel_size, log_level, api_peers) if attach is None
                    else [AttachedChannel(address) for address in attach])
        try:
            self.tokenizer = load_tokenizer(config.tokenizer or config.model, config.chat_template)
        except BaseException:
            close_all(channels)
            raise
        self.cores = wait_cores(channels)
        self.dp = CoreSet(self.cores, config.enable_prefix_caching, shared=api_peers > 0 or attach is not None)
        self.info: Ready = self.dp.info
        self.max_model_len = self.info.max_model_len
        self.processor = InputProcessor(self.model_config, self.tokenizer, self.max_model_len, config)
        self.output_processor = OutputProcessor(self.tokenizer, stream_interval)
        fault_injection.install_api_faults(self.output_processor, self.cores[0].channel,
                                           fault_injection.from_env(fault_injection.API_SITES))
        self.metrics = metrics
        for core in self.cores:
            metrics.on_ready(core.index, core.info.block_size, core.info.num_kv_blocks, config.enable_prefix_caching)
            core.watchdog = CoreWatchdog(core.channel.stamps, core_timeout_s, core_heartbeat_timeout_s,
                                         partial(self._waiting_since, core), partial(self._core_stuck, core))
        self.max_num_waiting = max_num_waiting
        self.routes: dict[str, _Route] = {}
        self.failure: RequestFailed | None = None  # set once no request can be served any more
        self.core_dead = False  # a core died, or was declared dead
        self.on_core_death: Callable[[], None] | None = None
        self.followers: Followers | None = None  # the further API processes, in the first one
        self._receivers: list[asyncio.Task] = []

    # --- life cycle --------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for core in self.cores:
            loop.add_reader(core.channel.sentinel, self._core_exited, core)
            self._receivers.append(asyncio.ensure_future(self._receive_loop(core)))
            core.watchdog.start()
        for index, sentinel in enumerate(self.followers.sentinels if self.followers else [], 1):
            loop.add_reader(sentinel, self._api_exited, index, sentinel)

    def decode(self, token_ids: list[int]) -> str:
        """Text of token ids (an echoed token-id prompt); ids as text without a tokenizer."""
        if self.tokenizer is None:
            return "".join(f"<{t}>" for t in token_ids)
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)

    def begin_shutdown(self) -> None:
        """Stop accepting; end in-flight requests with an error and abort them in the core."""
        if self.failure is None:
            self.failure = RequestFailed(503, "the server is shutting down; the request was aborted")
            self._fail_all(self.failure)
            if self.followers is not None:
                self.followers.terminate()

    async def close(self) -> None:
        self.begin_shutdown()
        loop = asyncio.get_running_loop()
        for core in self.cores:
            loop.remove_reader(core.channel.sentinel)
            await core.watchdog.stop()
        for task in self._receivers:
            task.cancel()
        await asyncio.gather(*self._receivers, return_exceptions=True)
        if self.followers is not None:  # the cores serve them until they are gone
            for sentinel in self.followers.sentinels:
                loop.remove_reader(sentinel)
            await loop.run_in_executor(None, self.followers.stop)
        await loop.run_in_executor(None, self.close_channels)

    def close_channels(self) -> None:
        """Stop every core (idempotent; also what a failed start needs)."""
        self.dp.close()

    @property
    def alive(self) -> bool:
        return self.dp.alive

    def health_problem(self) -> str | None:
        """Why ``/health`` must answer 503, or None."""
        return self.dp.health_problem()

    # --- requests ----------------------------------------------------------------------------
    def submit(self, requests: list[EngineRequest], prompts: list[str | None], stream: bool) -> RequestHandle:
        """Queue one API request's engine requests (choice i is ``requests[i]``)."""
        if self.failure is not None:  # shutting down, or a core is gone: unavailable either way
            raise APIError(503, self.failure.message)
        self._admit(len(requests))
        cores = self.dp.choose(requests)
        # encoded before anything is registered: a request that fails here leaves no trace
        frames = {core: self._encode([r for r, c in zip(requests, cores) if c is core]) for core in set(cores)}
        handle = RequestHandle(self, [r.request_id for r in requests])
        now = time.perf_counter()
        for index, (request, prompt, core) in enumerate(zip(requests, prompts, cores)):
            self.output_processor.add(request.request_id, prompt, request.prompt_token_ids, request.params, stream)
            self._open(core, request.request_id, _Route(handle, index, now, core, len(request.prompt_token_ids)))
        try:
            for core, frame in frames.items():
                core.channel.send_encoded(frame)
        except CoreDeadError as exc:
            self.abort(handle.engine_ids)
            raise APIError(503, str(exc)) from exc
        for request, core in zip(requests, cores):
            self.metrics.on_prompt_tokens(len(request.prompt_token_ids), core.index)
        return handle

    def _open(self, core: CoreLink, rid: str, route: _Route) -> None:
        self.dp.opened(core)
        self.routes[rid] = route

    def _close_route(self, rid: str) -> _Route | None:
        route = self.routes.pop(rid, None)
        if route is not None:
            self.dp.closed(route.core)
        return route

    def _encode(self, requests: list[EngineRequest]) -> bytes:
        """Seeds drawn, values checked against what the step contract carries, the message encoded:
        a value the engine cannot take is this request's 400, never the core's (or a step's) failure."""
        for request in requests:
            self.processor.assign_seed(request)
            try:
                check_representable(request)
            except ValueError as exc:
                raise bad_request(exc) from exc
        try:
            return self.cores[0].channel.encoder.encode(AddRequests(requests))
        except (msgspec.EncodeError, OverflowError, UnicodeError) as exc:
            raise APIError(400, f"the request holds a value the engine cannot take ({type(exc).__name__})") from exc

    def _admit(self, count: int) -> None:
        """429 when more than ``max_num_waiting`` requests would wait for a place in a batch: those
        beyond the cores' ``max_num_seqs`` in flight, or the cores' last reported queues if longer
        (KV-bound)."""
        if self.max_num_waiting is None:
            return
        reported = sum(core.num_waiting_reported for core in self.cores)
        waiting = max(len(self.routes) + count - self.info.max_num_seqs, reported)
        if waiting > self.max_num_waiting:
            raise APIError(429, f"the server is at capacity: {waiting} requests would be waiting, more than "
                                f"--max-num-waiting {self.max_num_waiting}; retry later", code="too_many_requests")

    def abort(self, engine_ids: list[str]) -> None:
        by_core: dict[CoreLink, list[str]] = {}
        for rid in engine_ids:
            route = self._close_route(rid)
            if route is not None:
                self.output_processor.abort(rid)
                by_core.setdefault(route.core, []).append(rid)
        for core, ids in by_core.items():
            self._finish_in_core(core, ids, "abort")

    def _finish_in_core(self, core: CoreLink, engine_ids: list[str], reason: str) -> None:
        if core.alive:
            try:
                core.channel.send(FinishRequests(engine_ids, reason))
            except CoreDeadError:
                pass  # the core is gone, and its requests with it

    # --- from the cores ----------------------------------------------------------------------
    async def _receive_loop(self, core: CoreLink) -> None:
        socket = core.channel.async_output()
        decoder = core.channel.decoder
        while True:
            frames = [await socket.recv(copy=False)]
            while len(frames) < MAX_MESSAGES_PER_WAKEUP:  # whatever else has arrived meanwhile
                try:
                    frames.append(await socket.recv(zmq.NOBLOCK, copy=False))
                except zmq.Again:
                    break
            steps = []
            for frame in frames:
                msg = decoder.decode(frame.buffer)
                if isinstance(msg, StepUpdate):
                    steps.append(msg)
                elif isinstance(msg, Failed):
                    log.error("the %s failed: %s", self.dp.name(core), msg.message)
                    self._core_failed(core, f"the {self.dp.name(core)} failed: {msg.message}")
            try:
                self._on_steps(core, steps)
            except Exception as exc:  # noqa: BLE001 - one bad step must not stop the routing of all others
                log.exception("processing steps from the engine core failed")
                self._fail_steps(core, steps, exc)
            # a recv that finds a message ready does not yield to the event loop: without this, a
            # core that keeps this task busy would starve the handlers that write the events
            await asyncio.sleep(0)

    def _on_steps(self, core: CoreLink, steps: list[StepUpdate]) -> None:
        """Process the steps that arrived together as one: when this process falls behind the core,
        each request gets one output (and its client one event) for all of them."""
        if not steps:
            return
        self._on_step_notices(core, steps)
        now = time.perf_counter()
        ttfts: list[float] = []
        itls: list[float] = []
        deltas = steps[0].deltas if len(steps) == 1 else StepDeltas.merge([m.deltas for m in steps])
        for msg in steps:
            self._token_times(msg.deltas.token_request_ids, now, ttfts, itls)
        processed = self.output_processor.process(deltas)
        if processed.stopped:
            self._finish_in_core(core, processed.stopped, "stop")
        for output in processed.outputs:
            route = self.routes.get(output.request_id)
            if route is None:
                continue
            if output.finished:
                self._close_route(output.request_id)
                self.metrics.on_finished(output.outputs[0].finish_reason or "stop", now - route.arrival, core.index,
                                         route.prompt_tokens, route.num_tokens)
            route.handle.queue.put_nowait((route.index, output))
        self.metrics.on_step(len(deltas.token_ids), ttfts, itls, [t for msg in steps for t in msg.queue_times],
                             core.index)

    def _on_step_notices(self, core: CoreLink, steps: list[StepUpdate]) -> None:
        """Refusals, failures and stats: applied before the output processing that could fail."""
        for msg in steps:
            for rid, why in msg.rejected.items():
                self._fail(rid, RequestFailed(500, f"the engine core refused the request: {why}"))
            for rid, why in msg.errors.items():
                self._fail(rid, RequestFailed(500, why))
            for rid, why in msg.deltas.errors.items():  # a request the core ended with an error
                self._fail(rid, RequestFailed(msg.deltas.error_status.get(rid, 500), why))
            if msg.stats is not None:
                self.dp.on_stats(core, msg.stats)
                self.metrics.on_stats(msg.stats, core.index)

    def _fail_steps(self, core: CoreLink, steps: list[StepUpdate], exc: Exception) -> None:
        """Processing these steps raised: their requests' text state is unknown, so they fail (and
        are aborted in the core); the rest carry on."""
        ids = {rid for msg in steps for rid in (*msg.deltas.token_request_ids, *msg.deltas.finished)}
        error = RequestFailed(500, f"the server failed to process this request's output ({type(exc).__name__})")
        routed = [rid for rid in ids if rid in self.routes]
        for rid in routed:
            self._fail(rid, error)
        if routed:
            self._finish_in_core(core, routed, "abort")

    def _token_times(self, request_ids: list[str], now: float, ttfts: list[float], itls: list[float]) -> None:
        routes = self.routes
        for rid in request_ids:
            route = routes.get(rid)
            if route is None:
                continue
            route.num_tokens += 1
            if route.first_token is None:
                route.first_token = now
                ttfts.append(now - route.arrival)
            else:
                itls.append(now - route.last_token)
            route.last_token = now

    def _waiting_since(self, core: CoreLink) -> float | None:
        return core.waiting_since if core.open and not core.channel.closed else None

    def _core_stuck(self, core: CoreLink, silent_s: float) -> None:
        why = "its step loop is stuck" if core.watchdog.responsive() else "its process does not run"
        name = self.dp.name(core)
        log.error("the %s made no progress for %.0f s while requests waited (%s): killing it", name, silent_s, why)
        core.channel.process.kill()
        self._core_failed(core, f"the {name} stopped responding ({silent_s:.0f} s without progress)")

    def _core_exited(self, core: CoreLink) -> None:
        asyncio.get_running_loop().remove_reader(core.channel.sentinel)
        if not core.channel.closed:
            core.channel.process.join(0.5)  # reap it, for its exit code (it has just ended)
            self._core_failed(core, f"the {self.dp.name(core)} process died (exit code "
                                    f"{core.channel.exitcode()})")

    def _api_exited(self, index: int, sentinel: int) -> None:
        asyncio.get_running_loop().remove_reader(sentinel)
        if self.followers is not None and not self.followers.stopping:
            self._core_failed(None, f"API process {index} died")

    def _core_failed(self, core: CoreLink | None, message: str) -> None:
        """A core is gone: every request fails with 503, now and from now on, and the server stops
        (docs/serving.md): under data parallelism too, so that whatever supervises the server
        restarts it whole rather than it serving on at a fraction of its capacity unnoticed."""
        first = not self.core_dead
        self.core_dead = True
        if core is not None:
            core.dead = True
        self.failure = RequestFailed(503, message)
        self._fail_all(self.failure)
        if first and self.on_core_death is not None:
            self.on_core_death()

    def _fail(self, rid: str, error: RequestFailed) -> None:
        route = self._close_route(rid)
        if route is not None:
            self.output_processor.abort(rid)
            route.handle.queue.put_nowait(error)

    def _fail_all(self, error: RequestFailed) -> None:
        by_core: dict[CoreLink, list[str]] = {}
        for rid, route in list(self.routes.items()):
            by_core.setdefault(route.core, []).append(rid)
            self._fail(rid, error)
        for core, ids in by_core.items():
            self._finish_in_core(core, ids, "abort")
