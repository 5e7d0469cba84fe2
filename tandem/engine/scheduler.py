"""Continuous batching: each step, running sequences first (decodes, then prefill chunks), then new
ones from the queue, under a token budget and the KV blocks available. When blocks run out, the
newest running sequence is preempted (freed, recomputed later from its tokens).

Scheduling is optimistic so a step can be planned while the previous one still runs: a scheduled
sampling step adds one pending token. Blocks and next-token rows of a sequence that leaves the batch
are released only once the newest step that includes it has completed.

The scheduler owns every request's state: it appends sampled tokens (``update``), decides when a
sequence is done (EOS, stop token ids, length), finishes, aborts and preempts.

The steady state costs O(changes), not O(sequences x fields): running sequences keep their counters
in a ``RunningState`` indexed by row, and when the KV blocks suffice for the step, the decoding ones
are planned and their tokens taken in with array operations (``decode_path``); per-sequence Python
runs only for prefill chunks, admissions, blocks filling up, finishes and preemption (when blocks run
short, for the sequences that need one).

With prefix caching (``blocks.cache``), a sequence being admitted starts after the longest chain of
cached full blocks of its tokens, shared with whoever holds them. Full prompt blocks are registered
in the cache as soon as a launched step computes their K/V, and so are blocks its outputs fill, when
the token that fills one comes back (``register_filled``): the work is spread over the steps, so
a batch that finishes together does not hash every output block in one step, and a later request
can start from an answer."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from tandem.contract.step import Logprobs, StepOutput
from tandem.engine.admission import AdmissionRamp
from tandem.engine.block_manager import BlockManager, RowPool
from tandem.engine.decode_path import DecodePath
from tandem.engine.deltas import LogprobEntries, StepDeltas
from tandem.engine.plan import ScheduledSeq, SchedulerOutput
from tandem.engine.prefix_cache import PrefixCacheStats, extend_block_hashes
from tandem.engine.running import RunningState
from tandem.engine.sequence import Sequence, SeqStatus
from tandem.engine.spec_path import SpecPath, SpecStats

__all__ = ["LogprobEntries", "ScheduledSeq", "Scheduler", "SchedulerOutput", "StepDeltas"]


@dataclass
class _DeferredRelease:
    """Blocks and a row that a launched step still reads: free once ``step_id`` has completed."""

    step_id: int
    block_ids: list[int]
    row: int | None


class Scheduler(DecodePath, SpecPath):
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, blocks: BlockManager, rows: RowPool,
                 eos_token_ids: frozenset[int] = frozenset(), max_blocks_per_seq: int = 0,
                 admission_ramp: bool = False) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.blocks = blocks
        self.cache = blocks.cache  # None: prefix caching is off
        self.rows = rows
        self.eos_token_ids = eos_token_ids
        self.eos_array = np.array(sorted(eos_token_ids), np.int64)
        self.state = RunningState(rows.num_rows, max_blocks_per_seq)
        self._running_rows: np.ndarray | None = None  # rows of ``running`` in order; None: rebuild
        self.requests: dict[str, Sequence] = {}
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._deferred: list[_DeferredRelease] = []
        self._next_step = 0
        self._last_done_step = -1
        self.num_preemptions = 0
        self.num_admissions = 0  # since start: sequences that joined the running batch (new or resumed)
        self.spec_stats = SpecStats()
        self.ramp = AdmissionRamp(admission_ramp)

    def add(self, seq: Sequence) -> None:
        if seq.request_id in self.requests:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        if seq.params.min_tokens:
            stops = set(seq.params.stop_token_ids) | (set() if seq.params.ignore_eos else set(self.eos_token_ids))
            seq.min_tokens_ban = np.array(sorted(stops), np.int64)
        self.requests[seq.request_id] = seq
        self.waiting.append(seq)
        if self._looks_up(seq):  # hashed now, not in the step that admits it with a wave of others
            extend_block_hashes(seq, self.blocks.block_size, (seq.num_tokens - 1) // self.blocks.block_size)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- planning one step ---------------------------------------------------------------
    def schedule(self, proposals: dict[str, list[int]] | None = None) -> SchedulerOutput:
        """``proposals``: speculative decoding's proposed tokens by request id, for decoding
        sequences whose tokens are all known (such a step goes through the per-sequence loop)."""
        out = SchedulerOutput(self._next_step)
        budget = self.max_num_batched_tokens
        # the decoding sequences, if blocks suffice for the step
        chunked = None if proposals else self.plan_decodes(out)
        if chunked is None:
            budget = self._schedule_running(out, budget, list(self.running), proposals or {})
        else:
            budget = self._schedule_running(out, budget - len(out), chunked)
        admitted = self._admit_waiting(out, budget, self.ramp.limit(len(self.running)))
        self.ramp.planned(out, admitted)
        if len(out):
            self._next_step += 1
        return out

    def running_rows(self) -> np.ndarray:
        """Rows of the running sequences, in order (rebuilt only after the running set changed)."""
        if self._running_rows is None:
            self._running_rows = np.fromiter((s.row for s in self.running), np.int64, len(self.running))
        return self._running_rows

    def _schedule_running(self, out: SchedulerOutput, budget: int, candidates: list[Sequence],
                          proposals: dict[str, list[int]] | None = None) -> int:
        """Per sequence, in order: a chunk of each candidate's remaining tokens, making room first."""
        for seq in candidates:
            if budget <= 0:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted to make room for an earlier candidate
            proposed = proposals.get(seq.request_id) if proposals else None
            if proposed and not seq.done_scheduling and seq.num_tokens - seq.num_computed == 1:
                n = self.speculation_size(seq, proposed, budget)
                if n:
                    budget -= self._take(out, seq, n, proposals=proposed[:n - 1] or None)
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            if seq.done_scheduling or n <= 0 or not self.make_room(seq, seq.num_computed + n):
                continue  # a sequence that cannot grow now waits while a preempted victim's blocks drain
            budget -= self._take(out, seq, n)
        return budget

    def _admit_waiting(self, out: SchedulerOutput, budget: int, limit: int | None = None) -> int:
        """Admits up to ``limit`` sequences (the admission ramp's; None: no cap); returns how many."""
        admitted = 0
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and admitted != limit:
            seq = self.waiting[0]
            if seq.num_pending:
                break  # a preempted sequence's in-flight token has not come back yet
            cached = self._cached_prefix(seq)
            num_cached = len(cached) * self.blocks.block_size
            n = min(seq.num_tokens - num_cached, budget)
            if not self.blocks.can_share_and_grow(cached, num_cached + n):
                break
            row = self.rows.acquire()
            if row is None:
                break
            self.waiting.popleft()
            self.num_admissions += 1
            seq.status = SeqStatus.RUNNING
            self._start_after(seq, cached)
            seq.attach(self.state, row)
            self.running.append(seq)
            self._running_rows = None
            admitted += 1
            budget -= self._take(out, seq, n, num_cached)
        return admitted

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks a sequence being admitted may start from: the longest cached chain of its
        full blocks, short of its last token, which must be computed (its logits are sampled). Whole
        blocks only, so the first computed token starts a block of its own: a shared block is never
        written."""
        if not self._looks_up(seq):
            return []
        usable = (seq.num_tokens - 1) // self.blocks.block_size
        return self.cache.lookup(extend_block_hashes(seq, self.blocks.block_size, usable))

    def _looks_up(self, seq: Sequence) -> bool:
        # a request that wants prompt logprobs needs every prompt position's logits: nothing is skipped
        return self.cache is not None and getattr(seq.params, "prompt_logprobs", None) is None

    def _start_after(self, seq: Sequence, cached: list[int]) -> None:
        """An admitted sequence takes its cached blocks; the cache counts the tokens looked up and found."""
        self.blocks.share(seq.block_ids, cached)
        seq.num_computed = len(cached) * self.blocks.block_size
        seq.num_registered_blocks = len(cached)
        if self._looks_up(seq):
            self.cache.stats.queries += seq.num_tokens
            self.cache.stats.hits += seq.num_computed

    def _take(self, out: SchedulerOutput, seq: Sequence, n: int, num_cached: int = 0,
              proposals: list[int] | None = None) -> int:
        start = seq.num_computed
        self.grow(seq, start + n)
        sample = start + n >= seq.num_tokens  # past it: a speculating sequence's proposals
        item = ScheduledSeq(seq, start, n, sample, seq.num_generated, num_cached=num_cached, proposals=proposals,
                            lagged=seq.spec_lag)
        seq.spec_lag = proposals is not None
        if proposals is not None:
            seq.proposed = proposals
        if seq.params.prompt_logprobs is not None:  # owed once per prompt position, also across preemption
            item.plp_start = max(start, seq.prompt_logprobs_next)
            item.plp_stop = max(item.plp_start, min(start + n, seq.prompt_len - 1))
            seq.prompt_logprobs_next = max(seq.prompt_logprobs_next, item.plp_stop)
        out.chunks.append(item)
        seq.num_computed += n
        seq.num_pending += item.num_samples  # optimistic: every proposal accepted, and one more
        seq.last_step = out.step_id
        if self.cache is not None and (start + n) // self.blocks.block_size > start // self.blocks.block_size:
            self.register_blocks(seq, start, start + n)  # some block became full in this chunk
        return n

    def register_blocks(self, seq: Sequence, start: int, end: int) -> None:
        """Put ``seq``'s blocks that fill up within positions [start, end) in the prefix cache, those
        whose tokens are all known (not pending on the device); K/V up to ``end`` is computed or
        being computed by a launched step.

        Registering a block as soon as the step that writes it is *scheduled* is safe: steps run in
        launch order on the device, so any later step reads it after it is written; and within one
        step every layer stores all of the step's K/V before its attention reads any, so a sequence
        scheduled later in the same step may read it too. A registered block is never written again
        (its tokens are full and known; a sharer's first computed token starts a fresh block). It is
        reused for other content only once its reference count is 0, and references are dropped only
        after the newest step that uses them has completed (``_release``). A step that is scheduled
        but never launched (an interruption between the two) leaves registered blocks unwritten:
        ``EngineCore.abort_all`` clears the cache."""
        bs = self.blocks.block_size
        first, last = start // bs, min(end, seq.prompt_len + len(seq.output_token_ids)) // bs
        if last > first:
            hashes = extend_block_hashes(seq, bs, last)
            self.cache.register_many(seq.block_ids[first:last], hashes[first:last])
            if self.cache.events is not None:  # KV-cache events for routers (engine/kv_events.py)
                self.cache.publish_stored(seq, hashes, first, last, bs)
            seq.num_registered_blocks = max(seq.num_registered_blocks, last)

    def register_filled(self, seqs: list[Sequence]) -> None:
        """Decoding ``seqs`` whose newest known token filled a block (its K/V is computed or in a
        launched step): register the blocks not registered yet."""
        bs = self.blocks.block_size
        for seq in seqs:
            self.register_blocks(seq, seq.num_registered_blocks * bs, seq.num_computed)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """More blocks for a running sequence, recorded in its row's block table."""
        held = len(seq.block_ids)
        self.blocks.grow(seq.block_ids, num_tokens)
        if len(seq.block_ids) > held:
            self.state.extend_blocks(seq.row, seq.block_ids[held:])

    def make_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Preempt from the newest end until ``seq`` fits; False if it cannot run this step."""
        if num_tokens <= len(seq.block_ids) * self.blocks.block_size:
            return True  # the common decode case: its last block has room
        while not self.blocks.can_grow(seq.block_ids, num_tokens):
            victim = self.running[-1]
            deferred = self.preempt(victim)
            if victim is seq or deferred:
                return False
        return True

    # --- results of a step ------------------------------------------------------------------
    def update(self, sched: SchedulerOutput, output: StepOutput, deltas: StepDeltas) -> None:
        """Step ``sched`` has completed on the device with ``output``: append its tokens, finish
        what is done, and record both in ``deltas``."""
        self._step_done(sched.step_id)
        if output.prompt_logprobs is not None:
            self._route_prompt_logprobs(sched, output.prompt_logprobs, deltas)
        tokens = np.asarray(output.token_ids, np.int64)
        num_decodes = 0
        if sched.decode is not None:
            num_decodes = len(sched.decode)
            self.accept_decodes(sched.decode, tokens[:num_decodes], output.logprobs, deltas)
        row = num_decodes
        for item in sched.chunks:
            if item.proposals:
                self.accept_proposals(item, sched.step_id, tokens[row:row + item.num_samples], output.logprobs, row,
                                      deltas)
            elif item.sample:
                self.accept_token(item.seq, int(tokens[row]), output.logprobs, row, deltas)
            row += item.num_samples

    def accept_token(self, seq: Sequence, token: int, logprobs: Logprobs | None, row: int,
                     deltas: StepDeltas) -> None:
        """One sampled token (from the step's sampled row ``row``) comes back for ``seq``."""
        if seq.finished:
            seq.num_pending -= 1
            return  # finished a step earlier: this token was computed speculatively
        seq.append_output(token)
        if self.cache is not None and (seq.prompt_len + len(seq.output_token_ids)) % self.blocks.block_size == 0:
            self.register_filled([seq])
        if seq.params.logprobs is not None:
            deltas.logprobs.add(seq.request_id, len(deltas.token_ids), token, logprobs, row, seq.params.logprobs)
        deltas.token_request_ids.append(seq.request_id)
        deltas.token_ids.append(token)
        reason = self.stop_reason(seq, token)
        if reason is not None:
            self.finish(seq.request_id, reason)
            deltas.finished[seq.request_id] = reason

    @staticmethod
    def _route_prompt_logprobs(sched: SchedulerOutput, found: Logprobs, deltas: StepDeltas) -> None:
        """The step's prompt-logprob entries, in the order the batch builder listed them."""
        row = 0
        for item in sched.chunks:
            seq = item.seq
            for position in range(item.plp_start, item.plp_stop):
                if not seq.finished:
                    deltas.prompt_logprobs.add(seq.request_id, position + 1, seq.prompt_token_ids[position + 1],
                                               found, row, seq.params.prompt_logprobs)
                row += 1

    def stop_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        stops = len(seq.output_token_ids) > p.min_tokens or not p.min_tokens  # EOS is banned before min_tokens
        if stops and (token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids)):
            return "stop"
        if len(seq.output_token_ids) >= seq.max_new_tokens:
            return "length"
        return None

    # --- leaving the batch ---------------------------------------------------------------
    def finish(self, request_id: str, reason: str) -> bool:
        """End a request (done, stopped by its text, or aborted); False if it is not here."""
        seq = self.requests.get(request_id)
        if seq is None:
            return False
        self.finish_many([(seq, reason)])
        return True

    def finish_many(self, ending: list[tuple[Sequence, str]]) -> None:
        """End these sequences (each still here): the running list is filtered once, so a batch that
        finishes together costs O(batch), not O(batch^2) list removals."""
        leaving = {id(seq) for seq, _ in ending if seq.status is SeqStatus.RUNNING}
        if leaving:
            staying = [seq for seq in self.running if id(seq) not in leaving]
            if len(staying) != len(self.running) - len(leaving):
                raise ValueError("a sequence marked running is not in the running list")
            self.running[:] = staying
            self._running_rows = None
        for seq, reason in ending:
            del self.requests[seq.request_id]
            if seq.status is SeqStatus.WAITING:
                self.waiting.remove(seq)
            seq.status, seq.finish_reason = SeqStatus.FINISHED, reason
            self._release(seq)

    def preempt(self, seq: Sequence) -> bool:
        """Back to the queue front, to be recomputed; returns True if its blocks free later."""
        self.running.remove(seq)
        self._running_rows = None
        seq.status, seq.num_computed = SeqStatus.WAITING, 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        return self._release(seq)

    def _release(self, seq: Sequence) -> bool:
        seq.detach()
        if self.cache is not None:  # any block not registered yet (a step planned one by one filled it)
            self.register_blocks(seq, max(seq.prompt_len, seq.num_registered_blocks * self.blocks.block_size),
                                 seq.num_computed)
            seq.num_registered_blocks = 0  # its blocks go; a resumed run counts again from what it finds
        blocks, row = seq.block_ids, seq.row
        seq.block_ids, seq.row = [], None
        if seq.last_step > self._last_done_step:
            self._deferred.append(_DeferredRelease(seq.last_step, blocks, row))
            return True
        self._free(blocks, row)
        return False

    def _step_done(self, step_id: int) -> None:
        """Step ``step_id`` has completed on the device: what only it still used can be reused."""
        self._last_done_step = step_id
        keep = []
        for entry in self._deferred:
            if entry.step_id <= step_id:
                self._free(entry.block_ids, entry.row)
            else:
                keep.append(entry)
        self._deferred = keep

    def all_steps_done(self) -> None:
        """Nothing is in flight any more (the engine drained the device): release everything deferred."""
        self._step_done(self._next_step - 1)

    def _free(self, blocks: list[int], row: int | None) -> None:
        self.blocks.free(blocks)
        if row is not None:
            self.rows.release(row)

    # --- what the engine reports ---------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        return self.cache.stats if self.cache is not None else PrefixCacheStats()

    def kv_usage(self) -> float:
        """Fraction of usable KV blocks held (by requests or by releases still deferred); cached blocks
        nobody holds count as free."""
        usable = self.blocks.num_blocks - 1
        return (usable - self.blocks.num_free) / usable
