"""The engine core: scheduler + worker + the step loop. Token ids in, token deltas out; no text.

One loop serves every worker: plan and submit step N+1, then collect and process step N. With
asynchronous batching the device runs step N+1 while the host processes step N and plans N+2; in
synchronous mode the worker finishes each step before ``submit`` returns, so the host and the device
take turns. Both modes make the same scheduling decisions from the same information, so they give
the same batches and the same tokens: the only difference is the overlap. This is what runs in the
engine-core process of the server, and in-process under ``LLMEngine``.

Structured output (``engine.structured``) keeps this order: a step's grammar mask needs the token
its previous step samples, so the core begins filling the mask of the newest step once every step
before it has been processed (``_begin_mask``: the grammar workers get the tokens and rows), plans
and builds the next step while they work, then hands the mask to the worker (``_provide_mask``)
just before submitting that next step (its tokens follow the masked step's sampling), and applies
the fill's endings after it (an ending found then is an abort of a request in flight). The device
runs the masked step's forward meanwhile, and only its sampling waits for the mask. Sync and async,
with grammar workers or without, take these turns in the same order.

Speculative decoding (``engine.speculation``) pipelines as any step: a speculating step is planned
while the previous one runs, and the next one on top of it (the device resolves what it accepted:
its accepted counts exist only in its output, ``worker.spec_lag``). The n-gram proposer's host
proposes after a guess of the step in flight's tokens; a draft model proposes on the device as the
first op of the verifying step (``Speculation.plan`` adds its part to the built step, and
``Speculation.processed`` gives the host its proposals before the step's tokens are taken in).
``spec_drains`` counts speculating plans that processed the steps in flight first (none with
either proposer: the tests hold it at 0). Whether a step speculates is decided before it is planned
from what the host knows then, which is the same in both loops, so they still make the same
decisions."""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from tandem.config import EngineConfig
from tandem.contract.worker import Worker
from tandem.engine.batch import build_step, padding_for
from tandem.engine.block_manager import BlockManager, RowPool
from tandem.engine.heap import HeapFreezer
from tandem.engine.kv_events import open_kv_events
from tandem.engine.observer import ProcessTimes, StepObserver, SubmitTimes
from tandem.engine.prefix_cache import PrefixCache
from tandem.engine.scheduler import Scheduler, SchedulerOutput, StepDeltas
from tandem.engine.sequence import EngineRequest, Sequence
from tandem.engine.speculation import Speculation
from tandem.switches import check_switches, flag

if TYPE_CHECKING:
    from tandem.engine.structured.manager import StructuredOutputs
    from tandem.engine.structured.rows import MaskedRows

log = logging.getLogger(__name__)


class CoreStats(msgspec.Struct, frozen=True, array_like=True):
    """The core's gauges and counters, as the server's /metrics exports them. One type in-process and
    on the wire: the engine-core process sends it as it is (``StepUpdate.stats``), array-like (no
    field names in the frame)."""

    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of usable KV blocks held
    num_preemptions: int  # since start
    gpu_idle_fraction: float | None  # over the most recent steps (None before two steps ran)
    prefix_cache_queries: int = 0  # since start, in tokens: looked up in the prefix cache at admission
    prefix_cache_hits: int = 0  # since start, in tokens: found there (not computed)
    gpu_busy_s: float = 0.0  # since start: device time in steps
    gpu_idle_s: float = 0.0  # since start: device time between steps while there was work
    spec_num_drafts: int = 0  # since start: sequence-steps that verified proposals (speculative decoding)
    spec_num_draft_tokens: int = 0  # since start: proposals verified
    spec_num_accepted_tokens: int = 0  # since start: proposals accepted


@dataclass
class _InFlight:
    sched: SchedulerOutput
    handle: Any  # the worker's handle to collect the step's output with
    masked: MaskedRows | None = None  # its grammar-constrained rows, whose mask follows the submission


class EngineCore:
    def __init__(self, config: EngineConfig, worker: Worker, eos_token_ids: frozenset[int]) -> None:
        check_switches()  # (a real worker's start-up checked them before it loaded the model)
        info = worker.info
        self.worker = worker
        self.block_size = info.block_size
        # Sliding-window models too: their blocks are never freed early (the kernels read a context's
        # block table whole and mask by window), so a cached block stays what its prefix computed
        cache = PrefixCache(open_kv_events(config.kv_events_config, info.block_size)) \
            if config.enable_prefix_caching else None
        self.scheduler = Scheduler(config.max_num_seqs, config.max_num_batched_tokens,
                                   BlockManager(info.num_kv_blocks, info.block_size, cache), RowPool(info.num_rows),
                                   eos_token_ids, max_blocks_per_seq=-(-info.max_model_len // info.block_size),
                                   admission_ramp=flag("TANDEM_ADMIT_RAMP"))
        self.in_flight: deque[_InFlight] = deque()
        self.observers: list[StepObserver] = []
        self.heap = HeapFreezer()
        self._model, self._eos_token_ids = config.model, eos_token_ids
        self._tokenizer = config.tokenizer
        self._grammar_workers = config.grammar_workers  # structured output's grammar processes (0: in this one)
        self._max_num_seqs = config.max_num_seqs
        self.structured: StructuredOutputs | None = None  # made for the first constrained request
        self.speculation = _speculation(config, worker)
        self.spec_drains = 0  # speculating plans that first processed the steps in flight (no overlap)
        self.spec_overlapped = 0  # speculating steps submitted while the step before them was in flight

    @property
    def grammars(self) -> StructuredOutputs:
        """Structured output's side of the loop (loads xgrammar, so only once a request needs it)."""
        if self.structured is None:
            from tandem.engine.structured.manager import StructuredOutputs

            self.structured = StructuredOutputs(self._model, self._eos_token_ids, tokenizer=self._tokenizer,
                                                workers=self._grammar_workers, max_rows=self._max_masked_rows,
                                                pin=getattr(self.worker, "pin_host_memory", None))
        return self.structured

    @property
    def _max_masked_rows(self) -> int:
        """A step's most sampled rows: one per sequence, and one per proposal of a speculating one."""
        return self._max_num_seqs * (1 + (self.speculation.config.k if self.speculation is not None else 0))

    def add_request(self, request: EngineRequest) -> None:
        seq = Sequence.from_request(request)
        if seq.params.host_masked:
            self.grammars.hold(seq, self.scheduler)  # queued once its grammar (if any) is compiled
        else:
            if self.structured is not None and seq.request_id in self.structured.held:
                raise ValueError(f"request id {seq.request_id!r} is already in use")
            self.scheduler.add(seq)
        self.heap.admitted()

    def finish_requests(self, request_ids: list[str], reason: str = "abort") -> list[str]:
        """End these requests now (aborted, or stopped by their text); returns those that were running
        (or waiting for their grammar)."""
        ended = [rid for rid in request_ids if self.scheduler.finish(rid, reason)]
        if self.structured is not None:
            ended += [rid for rid in request_ids if self.structured.drop(rid)]
        if self.speculation is not None:
            self.speculation.ended(ended)
        return ended

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work() or bool(self.in_flight) or bool(self.structured and self.structured.held)

    def step(self) -> StepDeltas:
        """Plan and launch one step; return what the step(s) completed meanwhile changed."""
        t_begin = time.perf_counter()
        deltas = StepDeltas()
        grammars = self.structured
        if grammars is not None and grammars.held:
            grammars.release(self.scheduler, deltas)  # compiled: into the queue (or failed: ended)
        admissions = self.scheduler.num_admissions
        proposals = self._speculate(deltas) if self.speculation is not None else None
        sched = self.scheduler.schedule(proposals)
        if self.scheduler.num_admissions != admissions:  # what a running sequence holds: its blocks, its row's state
            self.heap.admitted()
        if len(sched):
            t_sched = time.perf_counter()
            masked = grammars.masked_rows(sched) if grammars is not None else None
            step = build_step(sched, self.block_size, padding_for(sched, self.worker.info),
                              None if masked is None else masked.sample_index)
            if self.speculation is not None:  # a draft model's part: it proposes on the device
                step = self.speculation.plan(step, sched)
            t_built = time.perf_counter()
            filled = self._provide_mask()  # the workers filled it while this step was planned
            if sched.speculative and self.in_flight:
                self.spec_overlapped += 1
            self.in_flight.append(_InFlight(sched, self.worker.submit(step), masked))
            for obs in self.observers:
                obs.step_submitted(sched, SubmitTimes(t_begin, t_sched, t_built, time.perf_counter()))
            if filled:
                grammars.conclude(self.scheduler, deltas)
        self._begin_mask()  # nothing was in flight before it: its mask can be begun now
        while self.in_flight and (len(self.in_flight) > 1 or not len(sched)):
            self._process_oldest(deltas)
        if self.speculation is not None and deltas.finished:
            self.speculation.ended(list(deltas.finished))
        if grammars is not None and grammars.held and not self.in_flight and not len(sched):
            grammars.wait(0.01)  # only compilations are left: wait for one rather than spin
        if not self.has_unfinished_requests():
            self.heap.idle()
        return deltas

    def _process_oldest(self, deltas: StepDeltas) -> None:
        if self._provide_mask():  # (no next step was planned to overlap with its fill)
            self.structured.conclude(self.scheduler, deltas)
        done = self.in_flight.popleft()
        t_collect = time.perf_counter()
        output = self.worker.collect(done.handle)
        t_collected = time.perf_counter()
        if self.speculation is not None:
            self.speculation.processed(done.sched, output)
        self.scheduler.update(done.sched, output, deltas)
        if done.masked is not None:
            self.structured.advance(done.masked, self.scheduler, deltas)
        self._begin_mask()
        if done.masked is not None:
            self.structured.settle(self.scheduler, deltas)  # fed its tokens if no fill began
        for obs in self.observers:
            obs.step_processed(done.sched.step_id, ProcessTimes(t_collect, t_collected, time.perf_counter()))

    def _speculate(self, deltas: StepDeltas) -> dict[str, list[int]] | None:
        """The proposals of the step about to be planned, if it speculates (placeholders for one that
        proposes on the device). A proposer that does not overlap (none the engine builds: one on
        known tokens only) has every step in flight processed first when it does, or when the newest
        one did."""
        spec = self.speculation
        if not spec.overlaps and any(f.sched.speculative for f in self.in_flight):  # what it gained decides
            self._drain(deltas)
        wants = spec.wants(self.scheduler)
        if wants and not spec.overlaps:
            self._drain(deltas)
        return spec.propose(self.scheduler) if wants else None

    def _drain(self, deltas: StepDeltas) -> None:
        if self.in_flight:
            self.spec_drains += 1
        while self.in_flight:
            self._process_oldest(deltas)

    def _begin_mask(self) -> None:
        """Begin filling the grammar mask of the newest step, once it is the only one in flight: every
        step before it has been processed, so each constrained request's matcher has all the tokens
        before its row. The grammar workers work on it while the loop returns and plans the next step."""
        if len(self.in_flight) == 1:
            newest = self.in_flight[0]
            if newest.masked is not None and not newest.masked.sent:
                masked = newest.masked
                self.structured.begin_fill(masked, self.worker.mask_buffer(newest.sched.step_id, len(masked.seqs),
                                                                           self.structured.words))

    def _provide_mask(self) -> bool:
        """Hand the worker the mask of the newest step if its fill began (waits for the grammar
        workers' rows); True if it did: the fill's endings (``conclude``) are due."""
        newest = self.in_flight[-1] if self.in_flight else None
        if newest is None or newest.masked is None or not newest.masked.sent or newest.masked.provided:
            return False
        self.worker.provide_mask(newest.sched.step_id, self.structured.mask_ready(newest.masked))
        return True

    def stats(self) -> CoreStats:
        s = self.scheduler
        cached = s.prefix_cache_stats
        busy, idle = self.worker.device_seconds()
        spec = s.spec_stats
        return CoreStats(s.num_running, s.num_waiting, s.kv_usage(), s.num_preemptions, self.worker.idle_fraction(),
                         cached.queries, cached.hits, busy, idle, spec.num_drafts, spec.num_draft_tokens,
                         spec.num_accepted_tokens)

    @property
    def prefix_caching(self) -> bool:
        """Whether prefix caching is on (asked for, and not turned off for the model)."""
        return self.scheduler.cache is not None

    def abort_all(self) -> list[str]:
        """Recover from an interrupted loop: wait for the device, drop what was in flight, end every
        request. The core is idle and usable afterwards."""
        self.worker.drain()
        self.in_flight.clear()
        aborted = self.finish_requests(list(self.scheduler.requests))
        if self.structured is not None:
            aborted += self.structured.drop_all()
        self.scheduler.all_steps_done()
        # an interruption between scheduling a step and submitting it leaves blocks registered that
        # no step wrote: forget every cached prefix rather than find out which
        self.scheduler.blocks.reset_cache()
        return aborted

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (a benchmark starts each run cold). Only while idle."""
        if self.has_unfinished_requests():
            raise RuntimeError("cannot reset the prefix cache while requests are running")
        self.scheduler.blocks.reset_cache()

    def set_async(self, enabled: bool) -> None:
        if self.has_unfinished_requests():
            raise RuntimeError("cannot switch between sync and async batching while requests are running")
        self.worker.set_async(enabled)

    def shutdown(self) -> None:
        if self._provide_mask():  # its endings no longer matter
            self.structured.conclude(self.scheduler, StepDeltas())
        while self.in_flight:
            self.worker.collect(self.in_flight.popleft().handle)
        self.scheduler.all_steps_done()
        if self.structured is not None:
            self.structured.shutdown()
        if self.scheduler.cache is not None:
            self.scheduler.cache.close()  # KV-cache events: what is queued goes out
        self.worker.shutdown()


def _speculation(config: EngineConfig, worker: Worker) -> Speculation | None:
    """Speculative decoding as ``config.speculative_config`` asks (None: off)."""
    spec = config.speculative
    if spec is None:
        return None
    if spec.method == "ngram":
        from tandem.spec.proposer import NgramProposer

        return Speculation(spec, NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max))
    make = getattr(worker, "draft_proposer", None)
    if make is None:
        raise ValueError(f"speculative_config: method 'draft' is not built for this worker ({type(worker).__name__}); "
                         "a single-device worker runs draft models (tensor parallelism does not yet)")
    return Speculation(spec, make(spec))
