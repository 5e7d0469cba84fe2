"""Host-masked requests in the step loop: what ``EngineCore`` asks of structured output (grammars)
and of the other rules only the host can decide (``rules``: bad words of several tokens, reasoning
before a grammar).

The mask of step N+1 depends on the token step N samples, which the host learns only after it has
submitted N+1 (asynchronous batching). So the loop is:

1. A request with a grammar waits here, out of the scheduler, while its grammar compiles
   (``GrammarCompiler``, off the loop); the other requests keep stepping. Once compiled it gets a
   matcher and joins the scheduler's queue (at once if its spec was compiled before); a spec that
   fails to compile ends it with an error (``StepDeltas.errors``).
2. Planning step N+1, ``masked_rows`` lists its constrained sampled rows (the ``mask_sample`` step
   field): the device runs N+1's forward while the host works on.
3. After processing step N, ``advance`` lists each masked request of N with new tokens (the step's
   deltas, as the scheduler appended them; never placeholders) to be fed to its rules.
4. Then ``begin_fill`` feeds them and fills N+1's mask rows from the rules, now in the state after
   N's tokens: the grammar workers get their share and the loop returns at once, so their work
   overlaps its planning and building of step N+2. Only then ``mask_ready`` waits for their rows and
   the core hands the mask to the worker (``Worker.provide_mask``: it must come before N+2 is
   submitted, whose tokens follow N+1's sampling), submits N+2, and ``conclude`` applies the fill's
   endings. (Without a fill to follow, ``settle`` feeds them at once.) A grammar that accepted a stop
   token ends its request ("stop"), one that rejected a token ends it with an error; such an ending
   is found after N+2 was planned with the request in it, so it ends like an abort of a request in
   flight (its later tokens are dropped). The scheduler sees every grammar's stop token itself: the
   ending comes later only with ``ignore_eos``, or on an error.

Where the rules run: with grammar workers (``structured_output_workers`` > 0, ``workers``), the
rules of each request with a grammar live in one worker process; a fill sends every worker its
requests' tokens and rows first, feeds and fills the rest (rules without a grammar) itself, and
collects the workers' answers when the mask is due, whose rows they wrote into shared memory (``shared_mask``). Without
workers all of it runs in ``begin_fill``. Both run ``stepping``'s code, begin and conclude their
fills at the same points of the loop, and the core sees the same endings in the same order (the fed requests' in step order, then the rows' in row order).

A row's mask is filled only when its rules have seen exactly the tokens before the row's output
index (checked); rows of requests that ended meanwhile allow everything (their token is dropped),
and a row the rules leave without any token ends its request with an error (its token is dropped)."""
from __future__ import annotations

import os
import time
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tandem.engine.deltas import StepDeltas
from tandem.engine.scheduler import Scheduler
from tandem.engine.sequence import Sequence
from tandem.engine.structured import stepping
from tandem.engine.structured.compiler import GrammarCompiler, clean_message
from tandem.engine.structured.matcher import RequestGrammar
from tandem.engine.structured.rows import MaskedRows, masked_rows, no_token_left, resolved_gen_index
from tandem.engine.structured.rules import TokenRules, rules_for, rules_spec
from tandem.engine.structured.vocab import tokenizer_info
from tandem.engine.structured.workers import GrammarWorkers, Lost, RemoteRules
from tandem.model.sources import resolve_model_config


@dataclass
class _Run:
    """One feeding of rules and filling of rows, begun (the workers' share sent) and not yet applied."""

    feed: list[Sequence]
    rows: list[tuple[int, Sequence, int]]
    mask: np.ndarray | None
    ended: dict[int, tuple[int, int, int]]  # id(seq) -> its stepping outcome, if not plainly accepted
    problems: dict[int, tuple[int, int]]  # mask row -> what went wrong filling it
    sent: list  # what went to the workers, until their answers are read
    gone: list[Sequence] = field(default_factory=list)  # requests of workers that died
    why: str = ""
    host_s: float = 0.0  # this loop's time on it (``fill_times``)


class StructuredOutputs:
    def __init__(self, model: str, eos_token_ids: frozenset[int], threads: int = 2,
                 tokenizer: str | None = None, workers: int = 0, max_rows: int = 256, pin: Any = None) -> None:
        """``workers``: grammar worker processes (0: the rules run in this process); ``max_rows``:
        the most masked rows a step can have (the shared mask's size); ``pin``: the device's
        ``Worker.pin_host_memory`` (page-locks the shared mask), if it has one."""
        vocab_size = resolve_model_config(model).vocab_size
        vocab_of = tokenizer or model  # --tokenizer: the grammar's tokens are the ones prompts are made of
        self.words = -(-vocab_size // 32)  # int32 words per mask row
        self.stop_ids = sorted(eos_token_ids)
        self.eos_token_ids = eos_token_ids
        self.stop_set = frozenset(self.stop_ids)  # the matchers' stop tokens
        self.compiler = GrammarCompiler(lambda: tokenizer_info(vocab_of, vocab_size, eos_token_ids), threads)
        self.held: dict[str, tuple[Sequence, Future]] = {}  # waiting for their grammar, in arrival order
        # seconds the loop spends on each fill (benchmarks): feeding tokens + filling rows here, sending,
        # waiting for the workers' rows, applying the endings (not the workers' time that overlapped)
        self.fill_times: list[float] | None = None
        self.pool = GrammarWorkers(workers, self.compiler.tokenizer_info, self.words, max_rows, self.stop_ids,
                                   pin) if workers else None
        self._remote: dict[int, Sequence] = {}  # a worker's handle -> its request
        self._feed: list[Sequence] = []  # requests with new tokens for their rules (``advance``)
        self._pending: _Run | None = None  # the fill begun, whose mask and endings are still to come
        self._grammar_ids: OrderedDict[tuple, int] = OrderedDict()  # spec key -> the id workers know it by
        self._serialized: OrderedDict[int, str] = OrderedDict()
        self._next_gid = 0
        self._slot = 0  # of the shared mask, alternating
        self._runs = 0
        import xgrammar as xgr

        # threads fill the rows of plain grammars (an H100 host: 256 rows of a 128K vocabulary in 0.70 ms
        # on 4 threads, 0.83 on one, 1.05 row by row: benchmarks/RESULTS.md)
        self.batch_fill = xgr.BatchGrammarMatcher(max(1, min(4, (os.cpu_count() or 1) // 2)))

    # --- requests waiting for their grammar ----------------------------------------------------------
    def hold(self, seq: Sequence, scheduler: Scheduler) -> None:
        """Take a host-masked request: into the scheduler if it has no grammar or its grammar is ready
        (and a grammar worker, if they are used), else held until it is."""
        if seq.request_id in self.held or seq.request_id in scheduler.requests:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        if seq.params.structured_outputs is None:
            seq.rules = rules_for(seq.params, None, self.words, self.eos_token_ids)
            scheduler.add(seq)
            return
        future = self.compiler.compile(seq.params.structured_outputs)
        if future.done() and future.exception() is None and (self.pool is None or self.pool.poll()):
            self._start(seq, future, scheduler)  # compiled before: it runs like any other request
        else:
            self.held[seq.request_id] = (seq, future)

    def release(self, scheduler: Scheduler, deltas: StepDeltas) -> None:
        """Held requests whose compilation ended: into the scheduler's queue, or ended with its error."""
        pool = self.pool
        ready = pool is None or pool.poll()
        for rid in [rid for rid, (_, future) in self.held.items() if future.done()]:
            seq, future = self.held[rid]
            error = future.exception()
            if error is None and not ready and pool.failure is None:
                continue  # compiled; waits for a grammar worker
            del self.held[rid]
            if error is None and not ready:
                _fail(deltas, rid, 500, f"structured output's grammar workers (structured_output_workers="
                                         f"{len(pool.procs)}) could not start: {pool.failure}; "
                                         "structured_output_workers=0 runs grammars in the engine's process")
            elif error is None:
                self._start(seq, future, scheduler)
            else:  # the InputProcessor parsed the spec: the compiler refused it
                _fail(deltas, rid, 400, str(error) if isinstance(error, ValueError) else
                      f"SamplingParams.structured_outputs cannot be compiled: {clean_message(error)}")

    def _start(self, seq: Sequence, future: Future, scheduler: Scheduler) -> None:
        compiled = future.result()
        spec = rules_spec(seq.params, self.words, self.eos_token_ids)
        if self.pool is None:
            seq.rules = TokenRules.from_spec(spec, RequestGrammar(compiled, self.stop_ids))
        else:
            gid = self._grammar_id(seq.params.structured_outputs.key())
            seq.rules = self.pool.assign(gid, lambda: self._serialize(gid, compiled), spec)
            self._remote[seq.rules.handle] = seq
        try:
            scheduler.add(seq)
        except Exception:
            self._release(seq)
            raise

    def _grammar_id(self, key: tuple) -> int:
        gid = self._grammar_ids.get(key)
        if gid is None:  # never reused: a spec forgotten here and seen again is sent again
            gid = self._grammar_ids[key] = self._next_gid
            self._next_gid += 1
            if len(self._grammar_ids) > 256:
                self._grammar_ids.popitem(last=False)
        self._grammar_ids.move_to_end(key)
        return gid

    def _serialize(self, gid: int, compiled: Any) -> str:
        text = self._serialized.get(gid)
        if text is None:
            text = self._serialized[gid] = compiled.serialize_json()
            if len(self._serialized) > 16:
                self._serialized.popitem(last=False)
        return text

    def wait(self, timeout: float) -> None:
        """Block until some held grammar is ready (or ``timeout``): for a loop with nothing else to do."""
        pending = [future for _, future in self.held.values() if not future.done()]
        if pending or self.pool is None:
            wait(pending, timeout, return_when=FIRST_COMPLETED)
        else:
            self.pool.wait_ready(timeout)

    def wait_for_workers(self, timeout: float = 60.0, every: bool = False) -> None:
        """Until a grammar worker is ready (``every``: all of them; at once without workers): for tests
        and benchmarks whose requests must not wait for one."""
        deadline = time.monotonic() + timeout
        while self.pool is not None and not (self.pool.poll() and (not every or all(p.ready for p in self.pool.procs))):
            if self.pool.failure is not None or time.monotonic() > deadline:
                raise RuntimeError(f"no grammar worker is ready: {self.pool.failure or 'timed out'}")
            self.pool.wait_ready(0.05)

    def drop(self, request_id: str) -> bool:
        """End a held request (aborted); False if it is not held."""
        return self.held.pop(request_id, None) is not None

    def drop_all(self) -> list[str]:
        ids = list(self.held)
        self.held.clear()
        self._feed.clear()
        if self._pending is not None:
            self._discard()
        return ids

    # --- the step loop -----------------------------------------------------------------------------------
    masked_rows = staticmethod(masked_rows)

    def advance(self, masked: MaskedRows, scheduler: Scheduler, deltas: StepDeltas) -> None:
        """Step ``masked`` was processed: its masked requests with new tokens are fed them by the
        ``fill`` (or ``settle``) that follows."""
        for seq in masked.seqs:
            rules = seq.rules
            if rules is None:
                continue
            if seq.finished:  # by its tokens (EOS, length, a stop id) or an abort: done with the rules
                self._release(seq)
            elif len(seq.output_token_ids) > rules.num_accepted and (not self._feed or self._feed[-1] is not seq):
                self._feed.append(seq)  # (once: a speculating sequence has a row per proposal, in a run)

    def begin_fill(self, masked: MaskedRows, out: np.ndarray | None = None) -> None:
        """Start filling step ``masked``'s mask: feed what ``advance`` listed and fill the rows, in the
        grammar workers (sent: they work while the loop plans the next step) and here (the rest, or
        all of it without workers). Into the shared mask with workers, else into ``out`` (the worker's
        buffer) or a new array (the worker may read it until the step is collected). ``mask_ready``
        hands the mask over, ``conclude`` the endings."""
        start = time.perf_counter()
        n, slot = len(masked.seqs), self._slot
        if self.pool is not None:
            if n > self.pool.mask.rows:
                raise RuntimeError(f"{n} masked rows in one step, the shared mask holds {self.pool.mask.rows}")
            mask, self._slot = self.pool.mask.slots[slot][:n], slot ^ 1
        else:
            mask = np.empty((n, self.words), np.int32) if out is None else out
        rows: list[tuple[int, Sequence, int, tuple[int, ...]]] = []
        for i, (seq, gen_index, ahead) in enumerate(zip(masked.seqs, masked.gen_index, masked.ahead)):
            if seq.rules is None or seq.finished:
                mask[i] = -1  # it ended since the step was planned: its token is dropped
            else:
                rows.append((i, seq, resolved_gen_index(seq, gen_index, ahead) if masked.lagged[i] else gen_index, ahead))
        self._pending = self._begin(rows, mask, slot)
        self._pending.host_s = time.perf_counter() - start
        masked.sent = True

    def mask_ready(self, masked: MaskedRows) -> np.ndarray:
        """The mask ``begin_fill`` started, once the workers' rows are in (waits for their answers)."""
        run = self._pending
        if run is None or not masked.sent or masked.provided:
            raise RuntimeError("mask_ready without a fill begun for this step")
        start = time.perf_counter()
        self._gather(run)
        masked.provided = True
        run.host_s += time.perf_counter() - start
        return run.mask

    def conclude(self, scheduler: Scheduler, deltas: StepDeltas) -> None:
        """The endings of the fill ``mask_ready`` finished (a grammar that stopped or rejected a
        token, a row with no token left, a lost worker): like aborts of requests in flight, since
        the loop has planned (and submitted) the next step meanwhile."""
        run, self._pending = self._pending, None
        if run is None:
            return
        start = time.perf_counter()
        self._apply(run, scheduler, deltas)
        if self.fill_times is not None:
            self.fill_times.append(run.host_s + time.perf_counter() - start)

    def settle(self, scheduler: Scheduler, deltas: StepDeltas) -> None:
        """Feed what ``advance`` listed when no fill followed it (at once: nothing to overlap)."""
        if self._feed:
            run = self._begin([], None, 0)
            self._gather(run)
            self._apply(run, scheduler, deltas)

    def _begin(self, rows: list[tuple[int, Sequence, int, tuple[int, ...]]], mask: np.ndarray | None,
               slot: int) -> _Run:
        if self._pending is not None:  # a loop that recovered from a failure dropped that fill's step
            self._discard()
        feed = [seq for seq in self._feed if seq.rules is not None and not seq.finished]
        self._feed = []
        sent = self._remote_share(feed, rows, slot) if self.pool is not None else []
        ended: dict[int, tuple[int, int, int]] = {}  # id(seq) -> its stepping outcome, if not plainly accepted
        local = feed if self.pool is None else [seq for seq in feed if isinstance(seq.rules, TokenRules)]
        if local:
            batch = [(seq.rules, seq.output_token_ids[seq.rules.num_accepted:]) for seq in local]
            for seq, outcome in zip(local, stepping.advance(batch, self.stop_set)):
                if outcome[0] != stepping.ACCEPTED:
                    ended[id(seq)] = outcome
        if self.pool is None and not ended:
            mine = [(i, seq.rules, gen, ahead) for i, seq, gen, ahead in rows]
        else:
            mine = [(i, None if id(seq) in ended else seq.rules, gen, ahead) for i, seq, gen, ahead in rows
                    if isinstance(seq.rules, TokenRules)]
        problems = {mine[j][0]: (kind, seen) for j, kind, seen in stepping.fill(mine, mask, self.batch_fill)} \
            if mine else {}
        return _Run(feed, rows, mask, ended, problems, sent)

    def _gather(self, run: _Run) -> None:
        """The workers' answers to ``run`` (if it sent any); rows of requests whose worker died allow
        everything (whatever it left there): those requests end, their tokens are dropped."""
        if not run.sent:
            return
        sent, run.sent = run.sent, []
        lost = self._collect(sent, run.ended, run.problems)
        if lost is not None:
            run.gone = [self._remote.pop(h) for h in lost.handles if h in self._remote]
            run.why = lost.why
            gone = {id(seq) for seq in run.gone}
            for i, seq, *_ in run.rows:
                if id(seq) in gone:
                    run.mask[i] = -1

    def _discard(self) -> None:
        """Drop the pending fill (its step was dropped): read the workers' answers, so that the next
        fill's are the next ones they send."""
        run, self._pending = self._pending, None
        self._gather(run)

    def _remote_share(self, feed: list[Sequence], rows: list[tuple[int, Sequence, int, tuple[int, ...]]],
                      slot: int) -> list:
        """Send each worker its requests' tokens and rows (first: they work while this process does its share)."""
        advances = [(seq.rules, seq.output_token_ids[seq.rules.num_accepted:]) for seq in feed
                    if isinstance(seq.rules, RemoteRules)]
        fills = [(seq.rules, i, gen, ahead) for i, seq, gen, ahead in rows if isinstance(seq.rules, RemoteRules)]
        return self.pool.send(advances, fills, slot) if advances or fills else []

    def _collect(self, sent: list, ended: dict, problems: dict) -> Lost | None:
        answers, lost = self.pool.collect(sent)
        for msg, done in answers:
            for entry, kind, token, index in done.advanced:
                ended[id(self._remote[msg.adv_handles[entry]])] = (kind, token, index)
            for entry, kind, seen in done.filled:
                problems[msg.fill_rows[entry]] = (kind, seen)
        return lost

    def _apply(self, run: _Run, scheduler: Scheduler, deltas: StepDeltas) -> None:
        self._endings(run, scheduler, deltas)
        self._runs += 1
        if self._remote and self._runs % 64 == 0:
            self._sweep()

    def _endings(self, run: _Run, scheduler: Scheduler, deltas: StepDeltas) -> None:
        """The run's endings, in a fixed order: the fed requests' in step order, then the rows'.
        Requests that ended before (aborted while the fill ran) only give their rules back."""
        if not run.ended and not run.problems and not run.gone:  # a step's usual case
            return
        lost_ids = {id(seq) for seq in run.gone}
        over = {id(seq) for seq in run.feed if seq.finished} | {id(seq) for _, seq, *_ in run.rows if seq.finished}
        for seq in run.feed:
            if id(seq) in lost_ids:
                continue
            kind, token, index = run.ended.get(id(seq), (stepping.ACCEPTED, -1, -1))
            if kind != stepping.ACCEPTED and id(seq) in over:
                self._release(seq)
            elif kind == stepping.REJECTED:  # the mask forbade it: an engine fault, this request's alone
                self._end(seq, "error", scheduler, deltas, f"the grammar rejected token {token} at output "
                                                           f"index {index} (an engine fault)")
            elif kind == stepping.STOPPED:  # it took a stop token (with ignore_eos the scheduler went on)
                self._end(seq, "stop", scheduler, deltas)
        for i, seq, gen_index, _ in run.rows:
            if id(seq) in lost_ids or (seq.finished and id(seq) not in over):  # (ended by an earlier row)
                continue
            kind, seen = run.problems.get(i, (0, 0))
            if kind == stepping.MISMATCH:
                raise RuntimeError(f"request {seq.request_id!r}: its rules have seen {seen} tokens, but the step "
                                   f"samples its output index {gen_index}")
            if kind == stepping.EMPTY and id(seq) in over:
                self._release(seq)
            elif kind == stepping.EMPTY:
                self._end(seq, "error", scheduler, deltas, no_token_left(seq, gen_index), 400)
        for seq in run.gone:  # every request the dead workers held, in this step or not
            seq.rules = None
            if not seq.finished:
                self._end(seq, "error", scheduler, deltas, run.why)

    def _sweep(self) -> None:
        """Drop the rules of requests that ended without passing ``advance`` (aborted while waiting)."""
        for seq in [seq for seq in self._remote.values() if seq.finished]:
            self._release(seq)

    def _release(self, seq: Sequence) -> None:
        rules, seq.rules = seq.rules, None
        if isinstance(rules, RemoteRules):
            self._remote.pop(rules.handle, None)
            self.pool.drop(rules)

    def _end(self, seq: Sequence, reason: str, scheduler: Scheduler, deltas: StepDeltas, error: str = "",
             status: int = 500) -> None:
        self._release(seq)
        scheduler.finish(seq.request_id, reason)
        deltas.finished[seq.request_id] = reason
        if error:
            deltas.errors[seq.request_id] = error
            deltas.error_status[seq.request_id] = status

    def shutdown(self) -> None:
        self.compiler.shutdown()
        if self.pool is not None:
            self.pool.shutdown()


def _fail(deltas: StepDeltas, rid: str, status: int, error: str) -> None:
    deltas.finished[rid] = "error"
    deltas.error_status[rid] = status
    deltas.errors[rid] = error
