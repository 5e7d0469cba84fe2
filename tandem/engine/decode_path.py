"""The scheduler's steady state with array operations: plan the decoding sequences of a step, and take
in the tokens a decode block sampled.

A running sequence is *decoding* when exactly one of its tokens is not computed yet (the newest,
known or still pending on the device) and it may produce more. Planning them all at once is exactly
what the per-sequence loop would decide when the KV blocks suffice for the step: the decoding
sequences take one token each (those whose next position starts a new block get one), and the
sequences with a prefill chunk left come after them in order. When blocks are short, only the
decoding sequences that need a new block go one by one, in order, through the loop's own rule
(preempt from the newest end, or wait); the others' token fits their last block either way.

Taking in tokens does per sequence only the unavoidable (appending to its output list); stop
conditions, logprob entries and counters are array operations, and sequences that need more
(stop token ids, logit bias, a finish) go one by one, and so do the sequences whose new token
filled a block, which the prefix cache registers then (``Scheduler.register_filled``)."""
from __future__ import annotations

import numpy as np

from tandem.contract.step import Logprobs
from tandem.engine.block_manager import BlockManager
from tandem.engine.deltas import StepDeltas
from tandem.engine.plan import DecodeBlock, SchedulerOutput
from tandem.engine.prefix_cache import PrefixCache
from tandem.engine.running import RunningState
from tandem.engine.sequence import Sequence, SeqStatus


class DecodePath:
    """The scheduler's array-operation paths (a mixin of ``Scheduler``, which defines the rest)."""

    decode_fast_path = True  # False: every step through the per-sequence loop (tests compare the two)

    running: list[Sequence]
    state: RunningState
    blocks: BlockManager
    cache: PrefixCache | None
    max_num_batched_tokens: int
    eos_array: np.ndarray

    def running_rows(self) -> np.ndarray: ...
    def stop_reason(self, seq: Sequence, token: int) -> str | None: ...
    def finish(self, request_id: str, reason: str) -> bool: ...
    def finish_many(self, ending: list[tuple[Sequence, str]]) -> None: ...
    def accept_token(self, seq: Sequence, token: int, logprobs: Logprobs | None, row: int,
                     deltas: StepDeltas) -> None: ...
    def register_filled(self, seqs: list[Sequence]) -> None: ...
    def make_room(self, seq: Sequence, num_tokens: int) -> bool: ...
    def grow(self, seq: Sequence, num_tokens: int) -> None: ...

    def plan_decodes(self, out: SchedulerOutput) -> list[Sequence] | None:
        """Put the decoding sequences in ``out.decode``; returns the other running sequences (prefill
        chunks to plan one by one), or None to leave the whole step to the per-sequence loop (no
        decodes, or more than the token budget)."""
        running = self.running
        if not running:
            return []
        if not self.decode_fast_path:
            return None
        st, rows = self.state, self.running_rows()
        tokens, computed = st.tokens[rows], st.computed[rows]
        left = tokens - computed
        decoding = np.flatnonzero((left == 1) & (tokens < st.max_tokens[rows]))
        chunked = np.flatnonzero(left > 1)
        if decoding.size == 0 or decoding.size > self.max_num_batched_tokens:
            return None
        r, c = rows[decoding], computed[decoding]
        grows = np.flatnonzero(c >= st.num_blocks[r] * self.blocks.block_size)
        chunked_seqs = [running[i] for i in chunked.tolist()]
        if grows.size > self.blocks.num_free:  # some must wait, or preempt
            running = list(running)  # preemption takes sequences off the end of the list
            decoding = self._grow_in_order(running, decoding, grows)
            if decoding.size == 0:
                return chunked_seqs
            r, c = rows[decoding], computed[decoding]
        elif grows.size:  # their next position starts a block: one new block each
            self._add_blocks([running[i] for i in decoding[grows].tolist()], r[grows])
        pending = st.pending[r]
        lagged = st.spec_lag[r]
        if lagged.any():  # their previous step speculated: this one does not (for the step after it)
            st.spec_lag[r] = False
        else:
            lagged = None
        st.computed[r] += 1
        st.tokens[r] += 1
        st.pending[r] += 1
        st.last_step[r] = out.step_id
        seqs = list(running) if decoding.size == len(running) else [running[i] for i in decoding.tolist()]
        out.decode = DecodeBlock(seqs, r, c, tokens[decoding] - st.prompt_len[r], pending, st.tag[r], st, lagged)
        return chunked_seqs

    def _add_blocks(self, seqs: list[Sequence], rows: np.ndarray) -> None:
        new = self.blocks.allocate(len(seqs))
        for seq, block in zip(seqs, new):
            seq.block_ids.append(block)
        self.state.add_blocks(rows, np.array(new, np.int64))

    def _grow_in_order(self, running: list[Sequence], decoding: np.ndarray, grows: np.ndarray) -> np.ndarray:
        """Blocks run short: the decoding sequences that need one ask for it in order, preempting from
        the newest end as the per-sequence loop does, and those that cannot have one wait. Only they
        run Python code: the others' one token fits their last block. Returns the decoding positions
        (in ``running``) that take their token: not preempted, not waiting."""
        waits = []
        for j in grows.tolist():
            seq = running[int(decoding[j])]
            if seq.status is not SeqStatus.RUNNING:
                break  # preempted for an earlier one: so is every later sequence
            if self.make_room(seq, seq.num_computed + 1):
                self.grow(seq, seq.num_computed + 1)
            else:
                waits.append(j)
        keep = decoding < len(self.running)  # victims leave from the end
        keep[waits] = False
        return decoding[keep]

    def accept_decodes(self, block: DecodeBlock, tokens: np.ndarray, logprobs: Logprobs | None,
                       deltas: StepDeltas) -> None:
        """The tokens a decode block sampled (in its order) come back."""
        st = self.state
        live = st.tag[block.rows] == block.tags  # rows still held by the sequence they were planned for
        if not live.all():  # finished or preempted since: one by one
            for i in np.flatnonzero(~live).tolist():
                self.accept_token(block.seqs[i], int(tokens[i]), logprobs, i, deltas)
            index = np.flatnonzero(live)
            seqs, rows, tokens = [block.seqs[i] for i in index.tolist()], block.rows[index], tokens[index]
        else:
            index, seqs, rows = np.arange(len(block)), block.seqs, block.rows
        if not seqs:
            return
        st.pending[rows] -= 1
        st.last_token[rows] = tokens
        token_list = tokens.tolist()
        for append, token in zip(st.append_output[rows].tolist(), token_list):
            append(token)
        first = len(deltas.token_ids)
        request_ids = st.request_ids[rows].tolist()
        deltas.token_request_ids += request_ids
        deltas.token_ids += token_list
        self._add_logprobs(st.logprobs[rows], request_ids, first, tokens, logprobs, index, deltas)
        out_len = st.tokens[rows] - st.pending[rows] - st.prompt_len[rows]
        if self.cache is not None:
            self._register_filled(seqs, rows, out_len)
        self._finish_stopped(seqs, rows, tokens, out_len, deltas)

    def _register_filled(self, seqs: list[Sequence], rows: np.ndarray, out_len: np.ndarray) -> None:
        """The sequences whose newest token completed a block (known tokens a multiple of the block
        size; its K/V is computed, or in flight once the next step is launched)."""
        st = self.state
        known = out_len + st.prompt_len[rows]
        full = np.minimum(known, st.computed[rows])
        filled = np.flatnonzero((full % self.blocks.block_size == 0) & (full > st.prompt_len[rows]))
        if filled.size:
            self.register_filled([seqs[i] for i in filled.tolist()])

    def _add_logprobs(self, ks: np.ndarray, request_ids: list[str], first: int, tokens: np.ndarray,
                      logprobs: Logprobs | None, sample_rows: np.ndarray, deltas: StepDeltas) -> None:
        wants = np.flatnonzero(ks >= 0)
        if wants.size == 0 or logprobs is None:
            return
        ids = request_ids if wants.size == len(request_ids) else [request_ids[i] for i in wants.tolist()]
        deltas.logprobs.add_rows(ids, first + wants, tokens[wants], logprobs, sample_rows[wants], ks[wants])

    def _finish_stopped(self, seqs: list[Sequence], rows: np.ndarray, tokens: np.ndarray,
                        out_len: np.ndarray, deltas: StepDeltas) -> None:
        """EOS (once ``min_tokens`` are out) and length as arrays; stop token ids one by one."""
        st = self.state
        min_tokens = st.min_tokens[rows]
        is_eos = np.zeros(len(tokens), bool)
        for eos_id in self.eos_array.tolist():  # one or a few ids: cheaper than np.isin
            is_eos |= tokens == eos_id
        eos = st.stops_on_eos[rows] & is_eos & ((out_len > min_tokens) | (min_tokens == 0))
        length = out_len + st.prompt_len[rows] >= st.max_tokens[rows]
        special = st.special[rows]
        ending = []
        for i in np.flatnonzero(eos | length | special).tolist():
            seq = seqs[i]
            reason = self.stop_reason(seq, int(tokens[i]))
            if reason is not None:
                ending.append((seq, reason))
                deltas.finished[seq.request_id] = reason
        if ending:
            self.finish_many(ending)
