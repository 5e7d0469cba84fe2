"""The engine-core process: builds the worker and ``EngineCore``, then runs the step loop alone, so
HTTP, tokenization and detokenization (in the API process) never take its GIL.

The loop blocks on the input socket only while the core has nothing to do; otherwise it drains
pending adds and aborts without blocking, runs one ``core.step()`` and sends what changed. The
process dies with the API process (``PR_SET_PDEATHSIG`` on Linux, and a parent-pid check
everywhere) and ignores SIGINT: Ctrl-C reaches the whole process group, and it is the API process
that decides how to shut down.

Messages say nothing about liveness: an idle core sends one idle report and then nothing, a busy
one sends stats at most every ``STATS_INTERVAL_S`` and nothing while a step runs. Liveness is in
shared memory instead (``tandem.server.liveness``): a heartbeat thread stamps the time every
``HEARTBEAT_INTERVAL_S`` and the loop stamps each of its turns."""
from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import sys
import time

import zmq

from tandem.config import EngineConfig
from tandem.engine.core import EngineCore
from tandem.engine.heap import freeze
from tandem.engine.observer import ProcessTimes, SubmitTimes
from tandem.engine.recovery import CoreStateError, recover
from tandem.engine.scheduler import SchedulerOutput, StepDeltas
from tandem.server import fault_injection
from tandem.server.liveness import CoreStamps
from tandem.server.messages import (AddRequests, Failed, FinishRequests, InputMessage, Ready, Shutdown, Stats,
                                    StepUpdate, input_decoder, output_encoder)
from tandem.server.step_gaps import StepGapLog

log = logging.getLogger(__name__)

IDLE_POLL_MS = 500  # how long an idle core blocks on its input before checking its parent again
PARENT_CHECK_S = 1.0  # while busy, how often the parent pid is checked
STATS_INTERVAL_S = 0.05  # stats cost a sort over the recent step times: not every step
MAX_CONSECUTIVE_FAULTS = 3  # failed steps with no token delivered between them: the core gives up
_PR_SET_PDEATHSIG = 1


class Fanout:
    """The core's output: one PUSH socket per API process (``--api-server-count``), each sent every
    message. An API process skips the requests it does not know; every one needs the stats."""

    def __init__(self, ctx: zmq.Context, addresses: list[str]) -> None:
        self.sockets = []
        for address in addresses:
            out = ctx.socket(zmq.PUSH)
            out.setsockopt(zmq.SNDHWM, 0)  # unbounded: sending never blocks the step loop
            out.setsockopt(zmq.LINGER, 2000)  # a final Failed message still gets out
            out.connect(address)
            self.sockets.append(out)

    def send(self, frame: bytes, copy: bool = True) -> None:
        for out in self.sockets:
            out.send(frame, copy=copy)

    def close(self) -> None:
        for out in self.sockets:
            out.close()


def core_main(config: EngineConfig, input_addr: str | list[str], output_addr: str | list[str], parent_pid: int,
              log_level: int, stamps: CoreStamps, env: dict[str, str] | None = None) -> None:
    """Entry point of the spawned process. ``env`` (its GPUs under data parallelism) is set before
    anything reads it: CUDA reads ``CUDA_VISIBLE_DEVICES`` when first initialised. An address list
    holds one address per API process: its requests arrive from all, its messages go to all."""
    os.environ.update(env or {})
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent_pid)
    stamps.start_heartbeat()
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s [core]: %(message)s")
    ctx = zmq.Context()
    inp = ctx.socket(zmq.PULL)
    inp.setsockopt(zmq.RCVHWM, 0)
    for address in [input_addr] if isinstance(input_addr, str) else input_addr:
        inp.connect(address)
    out = Fanout(ctx, [output_addr] if isinstance(output_addr, str) else output_addr)
    encoder = output_encoder()
    code = 0
    try:
        core = _build_core(config)
    except BaseException as exc:  # noqa: BLE001 - whatever stops start-up is reported, then we exit
        out.send(encoder.encode(Failed(_describe(exc), during_startup=True)))
        code = 1
    else:
        gc.collect()
        freeze()  # start-up objects leave the collector's view: collections stay short in the loop
        info = core.worker.info
        out.send(encoder.encode(Ready(info.max_model_len, config.max_num_seqs, info.num_kv_blocks,
                                      info.block_size, info.device, info.device_name, info.dtype)))
        code = _serve(core, inp, out, parent_pid, stamps)
    inp.close(linger=0)
    out.close()
    ctx.term()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # skip interpreter finalization: nothing is left to clean up, and extension modules (Triton's)
    # print reference-leak noise at exit
    os._exit(code)


def _serve(core: EngineCore, inp: zmq.Socket, out: Fanout, parent_pid: int, stamps: CoreStamps) -> int:
    loop = CoreLoop(core, inp, out, parent_pid, stamps)
    try:
        loop.run()
    except Exception as exc:  # noqa: BLE001 - the API process must hear why the core stopped
        log.exception("engine core loop failed")
        out.send(output_encoder().encode(Failed(_loop_failure(exc), during_startup=False)))
        return 1
    if loop.gaps is not None:
        try:
            loop.gaps.write()  # while the worker still runs: its timing drains it
        except Exception:  # noqa: BLE001 - a diagnostic: shutting down anyway
            log.exception("writing TANDEM_STEP_LOG failed")
    try:
        core.abort_all()
        core.shutdown()
    except Exception:  # noqa: BLE001 - shutting down anyway
        log.exception("engine core shutdown failed")
    return 0


def _build_core(config: EngineConfig) -> EngineCore:
    from tandem.model.sources import resolve_model_config
    from tandem.runtime import create_worker

    model_config = resolve_model_config(config.model)
    core = EngineCore(config, create_worker(config), frozenset(model_config.eos_token_ids))
    fault_injection.install_core_faults(core, fault_injection.from_env(fault_injection.CORE_SITES))  # test-only
    return core


def _loop_failure(exc: BaseException) -> str:
    """For clients: our own words, or the exception's type; never its text (paths, internals)."""
    return str(exc) if isinstance(exc, CoreStateError) else f"the step loop raised {type(exc).__name__}"


def _describe(exc: BaseException) -> str:
    # ValueError & co. carry messages written for users (bad option, missing checkpoint)
    if isinstance(exc, (ValueError, FileNotFoundError, NotImplementedError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass  # the parent-pid checks in the loop remain
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


class CoreLoop:
    """The step loop of the core process (also a ``StepObserver``, for the queue-time metric)."""

    def __init__(self, core: EngineCore, inp: zmq.Socket, out: Fanout, parent_pid: int,
                 stamps: CoreStamps) -> None:
        self.core = core
        self.stamps = stamps
        self.inp = inp
        self.out = out
        self.parent_pid = parent_pid
        self.decoder = input_decoder()
        self.encoder = output_encoder()
        self.arrivals: dict[str, float] = {}  # request id -> arrival, until first scheduled
        self.queue_times: list[float] = []
        self.rejected: dict[str, str] = {}
        self.errors: dict[str, str] = {}  # request id -> why a failed step ended it
        self.live: set[str] = set()  # requests the API process waits for: added, not yet reported ended
        self.consecutive_faults = 0
        self.next_stats = 0.0
        self.next_parent_check = 0.0
        self.idle_reported = True
        core.observers.append(self)
        self.gaps = StepGapLog.from_env(core)  # TANDEM_STEP_LOG: where the device's idle time goes

    def run(self) -> None:
        """Returns on a Shutdown message; exits the process if the parent is gone."""
        while True:
            self.stamps.progressed()  # each turn: after a step, or at least every IDLE_POLL_MS while idle
            if not self.core.has_unfinished_requests():
                self._report_idle()
                if not self.inp.poll(IDLE_POLL_MS):
                    self._check_parent()
                    continue
            if not self._drain_input():
                return
            if self.core.has_unfinished_requests():
                self._step()

    def _step(self) -> None:
        try:
            deltas = self.core.step()
        except Exception as exc:  # noqa: BLE001 - a failed step ends its requests, not the server
            deltas = self._recover(exc)
        if deltas:  # a step that only launches work proves nothing; one that delivers tokens does
            self.consecutive_faults = 0
        self.live.difference_update(deltas.finished)
        self.idle_reported = False
        now = time.perf_counter()
        stats = None
        if now >= self.next_stats:
            stats, self.next_stats = self._stats(), now + STATS_INTERVAL_S
        if deltas or stats is not None or self.queue_times or self.rejected or self.errors:
            self._send(deltas, stats)
        if now >= self.next_parent_check:
            self.next_parent_check = now + PARENT_CHECK_S
            self._check_parent()

    def _recover(self, exc: Exception) -> StepDeltas:
        """End every request the failed step could have touched, with an error the API process
        forwards to its client; raises CoreStateError when the core should give up instead."""
        self.consecutive_faults += 1
        if self.consecutive_faults >= MAX_CONSECUTIVE_FAULTS:
            raise CoreStateError(f"{self.consecutive_faults} steps failed with no progress between them "
                                 f"({type(exc).__name__})") from exc
        log.exception("a step failed: ending the requests it held; the core serves on")
        ended = recover(self.core, self.live)
        message = (f"an internal error ({type(exc).__name__}) in the engine core ended this request; "
                   "the server is still serving, retry it")
        for rid in ended:
            self.errors[rid] = message
            self.arrivals.pop(rid, None)
        self.live.difference_update(ended)
        return StepDeltas()

    def _report_idle(self) -> None:
        """Once per idle period: the gauges at rest (nothing running, KV blocks free)."""
        if not self.idle_reported or self.rejected or self.errors:
            self.core.worker.pause_device_clock()  # waiting for requests is not the device's idling
            if self.gaps is not None:
                self.gaps.core_idle()
            self._send(StepDeltas(), self._stats())
            self.idle_reported = True

    def _send(self, deltas: StepDeltas, stats: Stats | None) -> None:
        msg = StepUpdate(deltas, stats, self.queue_times, self.rejected, self.errors)
        self.queue_times, self.rejected, self.errors = [], {}, {}
        self.out.send(self.encoder.encode(msg), copy=False)

    def _stats(self) -> Stats:
        return self.core.stats()  # one type in the core and on the wire

    def _drain_input(self) -> bool:
        """Apply every pending message without blocking; False on Shutdown."""
        while True:
            try:
                frame = self.inp.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return True
            if not self._apply(self.decoder.decode(frame.buffer)):
                return False

    def _apply(self, msg: InputMessage) -> bool:
        if isinstance(msg, AddRequests):
            now = time.perf_counter()
            for request in msg.requests:
                try:
                    self.core.add_request(request)
                except ValueError as exc:
                    self.rejected[request.request_id] = str(exc)
                    continue
                self.arrivals[request.request_id] = now
                self.live.add(request.request_id)
        elif isinstance(msg, FinishRequests):
            self.core.finish_requests(msg.request_ids, msg.reason)
            self.live.difference_update(msg.request_ids)
            for rid in msg.request_ids:
                self.arrivals.pop(rid, None)
        elif isinstance(msg, Shutdown):
            return False
        return True

    def _check_parent(self) -> None:
        if os.getppid() != self.parent_pid:
            log.warning("the API process is gone: exiting")
            os._exit(1)

    # --- StepObserver ----------------------------------------------------------------------
    def step_submitted(self, sched: SchedulerOutput, times: SubmitTimes) -> None:
        if not self.arrivals:
            return  # every known request has been scheduled: nothing to look for
        for item in sched.chunks:  # admissions are chunks
            if item.start == item.num_cached:  # a first chunk; a preempted one's arrival was popped already
                arrived = self.arrivals.pop(item.seq.request_id, None)
                if arrived is not None:
                    self.queue_times.append(times.begin - arrived)

    def step_processed(self, step_id: int, times: ProcessTimes) -> None:
        pass
