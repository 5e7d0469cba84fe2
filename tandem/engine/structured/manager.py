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
4. Then ``fill`` feeds them and writes N+1's mask rows from the rules, now in the state after N's
   tokens, and the core hands them to the worker (``Worker.provide_mask``); only N+1's sampling
   waited for them. (Without a fill to follow, ``settle`` feeds them.) A grammar that accepted a
   stop token ends its request ("stop"), one that rejected a token ends it with an error.

Where the rules run: with grammar workers (``structured_output_workers`` > 0, ``workers``), the
rules of each request with a grammar live in one worker process; a fill sends every worker its
requests' tokens and rows first, feeds and fills the rest (rules without a grammar) itself, then
collects the workers' answers, whose rows they wrote into shared memory (``shared_mask``). Without
workers all of it runs here. Both run ``stepping``'s code, and the core sees the same endings in
the same order (the fed requests' in step order, then the rows' in row order).

A row's mask is filled only when its rules have seen exactly the tokens before the row's output
index (checked); rows of requests that ended meanwhile allow everything (their token is dropped),
and a row the rules leave without any token ends its request with an error (its token is dropped)."""
from __future__ import annotations

import os
import time
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import Any

import numpy as np

from tandem.engine.deltas import StepDeltas
from tandem.engine.plan import SchedulerOutput
from tandem.engine.scheduler import Scheduler
from tandem.engine.sequence import Sequence
from tandem.engine.structured import stepping
from tandem.engine.structured.compiler import GrammarCompiler, clean_message
from tandem.engine.structured.matcher import RequestGrammar
from tandem.engine.structured.rules import TokenRules, rules_for, rules_spec
from tandem.engine.structured.vocab import tokenizer_info
from tandem.engine.structured.workers import GrammarWorkers, Lost, RemoteRules
from tandem.model.sources import resolve_model_config


@dataclass
class MaskedRows:
    """A step's host-masked sampled rows, ascending; its mask's row i is for ``seqs[i]``."""

    sample_index: np.ndarray  # int64: which of the step's sampled rows (the ``mask_sample`` field)
    seqs: list[Sequence]
    gen_index: list[int]  # the output index each row samples: its rules must have seen that many tokens
    provided: bool = False  # the mask went to the worker


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
        self.fill_times: list[float] | None = None  # seconds of each fill: feeding tokens + filling rows (benchmarks)
        self.pool = GrammarWorkers(workers, self.compiler.tokenizer_info, self.words, max_rows, self.stop_ids,
                                   pin) if workers else None
        self._remote: dict[int, Sequence] = {}  # a worker's handle -> its request
        self._feed: list[Sequence] = []  # requests with new tokens for their rules (``advance``)
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
        return ids

    # --- the step loop -----------------------------------------------------------------------------------
    def masked_rows(self, sched: SchedulerOutput) -> MaskedRows | None:
        """The step's sampled rows of host-masked requests: the decode block's first (their running
        state's flag), then its sampled chunks, in the step's sampled-row order."""
        index: list[int] = []
        seqs: list[Sequence] = []
        gen: list[int] = []
        first = 0
        d = sched.decode
        if d is not None:
            hits = np.flatnonzero(d.state.structured[d.rows])
            if hits.size:
                index = hits.tolist()
                seqs = [d.seqs[i] for i in index]
                gen = d.gen_index[hits].tolist()
            first = len(d)
        for item in sched.chunks:
            if item.sample:
                if item.seq.params.host_masked:
                    index.append(first)
                    seqs.append(item.seq)
                    gen.append(item.gen_index)
                first += item.num_samples  # a speculating sequence (never a masked one) samples several
        return MaskedRows(np.array(index, np.int64), seqs, gen) if seqs else None

    def advance(self, masked: MaskedRows, scheduler: Scheduler, deltas: StepDeltas) -> None:
        """Step ``masked`` was processed: its masked requests with new tokens are fed them by the
        ``fill`` (or ``settle``) that follows."""
        for seq in masked.seqs:
            rules = seq.rules
            if rules is None:
                continue
            if seq.finished:  # by its tokens (EOS, length, a stop id) or an abort: done with the rules
                self._release(seq)
            elif len(seq.output_token_ids) > rules.num_accepted:
                self._feed.append(seq)

    def fill(self, masked: MaskedRows, scheduler: Scheduler, deltas: StepDeltas,
             out: np.ndarray | None = None) -> np.ndarray:
        """Feed what ``advance`` listed, then the step's mask, int32 [rows, words]: into the shared
        mask with workers, else into ``out`` (the worker's buffer) or a new array (the worker may read
        it until the step is collected). A request whose rules leave no token ends here with an error."""
        start = time.perf_counter()
        n, slot = len(masked.seqs), self._slot
        if self.pool is not None:
            if n > self.pool.mask.rows:
                raise RuntimeError(f"{n} masked rows in one step, the shared mask holds {self.pool.mask.rows}")
            mask, self._slot = self.pool.mask.slots[slot][:n], slot ^ 1
        else:
            mask = np.empty((n, self.words), np.int32) if out is None else out
        rows: list[tuple[int, Sequence, int]] = []
        for i, (seq, gen_index) in enumerate(zip(masked.seqs, masked.gen_index)):
            if seq.rules is None or seq.finished:
                mask[i] = -1  # it ended since the step was planned: its token is dropped
            else:
                rows.append((i, seq, gen_index))
        self._run(rows, mask, slot, scheduler, deltas)
        masked.provided = True
        if self.fill_times is not None:
            self.fill_times.append(time.perf_counter() - start)
        return mask

    def settle(self, scheduler: Scheduler, deltas: StepDeltas) -> None:
        """Feed what ``advance`` listed when no fill followed it."""
        if self._feed:
            self._run([], None, 0, scheduler, deltas)

    def _run(self, rows: list[tuple[int, Sequence, int]], mask: np.ndarray | None, slot: int,
             scheduler: Scheduler, deltas: StepDeltas) -> None:
        feed = [seq for seq in self._feed if seq.rules is not None and not seq.finished]
        self._feed = []
        remote = self.pool is not None and self._remote_share(feed, rows, slot)
        ended: dict[int, tuple[int, int, int]] = {}  # id(seq) -> its stepping outcome, if not plainly accepted
        local = feed if self.pool is None else [seq for seq in feed if isinstance(seq.rules, TokenRules)]
        if local:
            batch = [(seq.rules, seq.output_token_ids[seq.rules.num_accepted:]) for seq in local]
            for seq, outcome in zip(local, stepping.advance(batch, self.stop_set)):
                if outcome[0] != stepping.ACCEPTED:
                    ended[id(seq)] = outcome
        if self.pool is None and not ended:
            mine = [(i, seq.rules, gen) for i, seq, gen in rows]
        else:
            mine = [(i, None if id(seq) in ended else seq.rules, gen) for i, seq, gen in rows
                    if isinstance(seq.rules, TokenRules)]
        problems = {mine[j][0]: (kind, seen) for j, kind, seen in stepping.fill(mine, mask, self.batch_fill)} \
            if mine else {}
        lost = self._collect(remote, ended, problems) if remote else None
        self._apply(feed, rows, mask, ended, problems, lost, scheduler, deltas)
        self._runs += 1
        if self._remote and self._runs % 64 == 0:
            self._sweep()

    def _remote_share(self, feed: list[Sequence], rows: list[tuple[int, Sequence, int]], slot: int) -> list:
        """Send each worker its requests' tokens and rows (first: they work while this process does its share)."""
        advances = [(seq.rules, seq.output_token_ids[seq.rules.num_accepted:]) for seq in feed
                    if isinstance(seq.rules, RemoteRules)]
        fills = [(seq.rules, i, gen) for i, seq, gen in rows if isinstance(seq.rules, RemoteRules)]
        return self.pool.send(advances, fills, slot) if advances or fills else []

    def _collect(self, sent: list, ended: dict, problems: dict) -> Lost | None:
        answers, lost = self.pool.collect(sent)
        for msg, done in answers:
            for entry, kind, token, index in done.advanced:
                ended[id(self._remote[msg.adv_handles[entry]])] = (kind, token, index)
            for entry, kind, seen in done.filled:
                problems[msg.fill_rows[entry]] = (kind, seen)
        return lost

    def _apply(self, feed: list[Sequence], rows: list[tuple[int, Sequence, int]], mask: np.ndarray | None,
               ended: dict, problems: dict, lost: Lost | None, scheduler: Scheduler, deltas: StepDeltas) -> None:
        """The run's endings, in a fixed order: the fed requests' in step order, then the rows'."""
        if not ended and not problems and lost is None:  # a step's usual case
            return
        gone = [self._remote.pop(h) for h in lost.handles if h in self._remote] if lost else []
        lost_ids = {id(seq) for seq in gone}
        for seq in feed:
            if id(seq) in lost_ids:
                continue
            kind, token, index = ended.get(id(seq), (stepping.ACCEPTED, -1, -1))
            if kind == stepping.REJECTED:  # the mask forbade it: an engine fault, this request's alone
                self._end(seq, "error", scheduler, deltas, f"the grammar rejected token {token} at output "
                                                           f"index {index} (an engine fault)")
            elif kind == stepping.STOPPED:  # it took a stop token (with ignore_eos the scheduler went on)
                self._end(seq, "stop", scheduler, deltas)
        for i, seq, gen_index in rows:
            if id(seq) in lost_ids:
                mask[i] = -1  # (whatever the worker left there): the request ends, its token is dropped
                continue
            kind, seen = problems.get(i, (0, 0))
            if kind == stepping.MISMATCH:
                raise RuntimeError(f"request {seq.request_id!r}: its rules have seen {seen} tokens, but the step "
                                   f"samples its output index {gen_index}")
            if kind == stepping.EMPTY:
                self._end(seq, "error", scheduler, deltas, no_token_left(seq, gen_index), 400)
        for seq in gone:  # every request the dead workers held, in this step or not
            seq.rules = None
            if not seq.finished:
                self._end(seq, "error", scheduler, deltas, lost.why)

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


def no_token_left(seq: Sequence, gen_index: int) -> str:
    p = seq.params
    others = [name for name, on in (("allowed_token_ids", p.allowed_token_ids is not None), ("bad_words", p.bad_words
              or p.bad_words_token_ids), ("min_tokens", gen_index < p.min_tokens)) if on]
    rules = " or ".join(others) or "the other restrictions"
    if p.structured_outputs is None:  # bad words of several tokens, with allowed_token_ids
        return f"no token is left to sample at output index {gen_index}: {rules} rule out every token"
    return (f"no token is left to sample at output index {gen_index}: structured_outputs' grammar allows only "
            f"tokens that {rules} rule out")
