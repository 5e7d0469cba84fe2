"""Continuous batching: each step, running sequences first (decodes and prefill chunks), then new
ones from the queue, under a token budget and the KV blocks available. When blocks run out, the
newest running sequence is preempted (freed, recomputed later from its tokens).

Scheduling is optimistic so a step can be planned while the previous one still runs: a scheduled
sampling step adds one pending token. Blocks and table slots of a sequence that leaves the batch are
released only once the newest step that includes it has completed (``step_done``)."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from tandem.engine.block_manager import BlockManager, SlotPool
from tandem.engine.sequence import Sequence, SeqStatus


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    start: int  # first position computed in this step
    num_tokens: int
    sample: bool  # the chunk reaches the end of the sequence, so a token is sampled
    gen_index: int  # index in the output of the token sampled (seeds the sampler's noise)


@dataclass
class SchedulerOutput:
    step_id: int
    items: list[ScheduledSeq]

    @property
    def num_tokens(self) -> int:
        return sum(item.num_tokens for item in self.items)


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, blocks: BlockManager,
                 slots: SlotPool) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.blocks = blocks
        self.slots = slots
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._deferred: list[tuple[int, list[int], int | None]] = []
        self._next_step = 0
        self._last_done_step = -1
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- planning one step ---------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(self._next_step, [])
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        self._admit_waiting(out, budget)
        if out.items:
            self._next_step += 1
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            if seq.done_scheduling or n <= 0:
                i += 1
                continue
            if not self._make_room(seq, seq.num_computed + n):
                if seq.status is SeqStatus.RUNNING:
                    i += 1  # skipped for one step while a preempted victim's blocks drain
                continue
            budget -= self._take(out, seq, n)
            i += 1
        return budget

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_pending:
                break  # a preempted sequence's in-flight token has not come back yet
            n = min(seq.num_tokens, budget)
            if not self.blocks.can_grow(seq.block_ids, n):
                break
            slot = self.slots.acquire()
            if slot is None:
                break
            self.waiting.popleft()
            seq.slot, seq.status = slot, SeqStatus.RUNNING
            self.running.append(seq)
            budget -= self._take(out, seq, n)

    def _take(self, out: SchedulerOutput, seq: Sequence, n: int) -> int:
        self.blocks.grow(seq.block_ids, seq.num_computed + n)
        sample = seq.num_computed + n == seq.num_tokens
        out.items.append(ScheduledSeq(seq, seq.num_computed, n, sample, seq.num_generated))
        seq.num_computed += n
        seq.num_pending += int(sample)
        seq.last_step = out.step_id
        return n

    def _make_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Preempt from the newest end until ``seq`` fits; False if it cannot run this step."""
        if num_tokens <= len(seq.block_ids) * self.blocks.block_size:
            return True  # the common decode case: its last block has room
        while not self.blocks.can_grow(seq.block_ids, num_tokens):
            victim = self.running[-1]
            deferred = self.preempt(victim)
            if victim is seq or deferred:
                return False
        return True

    # --- leaving the batch ---------------------------------------------------------------
    def preempt(self, seq: Sequence) -> bool:
        """Back to the queue front, to be recomputed; returns True if its blocks free later."""
        self.running.remove(seq)
        seq.status, seq.num_computed = SeqStatus.WAITING, 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        return self._release(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = SeqStatus.FINISHED, reason
        self._release(seq)

    def _release(self, seq: Sequence) -> bool:
        blocks, slot = seq.block_ids, seq.slot
        seq.block_ids, seq.slot = [], None
        if seq.last_step > self._last_done_step:
            self._deferred.append((seq.last_step, blocks, slot))
            return True
        self._free(blocks, slot)
        return False

    def step_done(self, step_id: int) -> None:
        """Step ``step_id`` has completed on the device: what only it still used can be reused."""
        self._last_done_step = step_id
        keep = []
        for entry in self._deferred:
            if entry[0] <= step_id:
                self._free(entry[1], entry[2])
            else:
                keep.append(entry)
        self._deferred = keep

    def _free(self, blocks: list[int], slot: int | None) -> None:
        self.blocks.free(blocks)
        if slot is not None:
            self.slots.release(slot)
