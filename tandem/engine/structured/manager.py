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
3. After processing step N, ``advance`` feeds each masked request of N its new tokens (the step's
   deltas, as the scheduler appended them; never placeholders); a grammar that accepted a stop
   token ends its request ("stop").
4. Then ``fill`` writes N+1's mask rows from the rules, now in the state after N's tokens, and the
   core hands them to the worker (``Worker.provide_mask``); only N+1's sampling waited for them.

A row's mask is filled only when its rules have seen exactly the tokens before the row's output
index (checked); rows of requests that ended meanwhile allow everything (their token is dropped),
and a row the rules leave without any token ends its request with an error (its token is dropped)."""
from __future__ import annotations

import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass

import numpy as np

from tandem.engine.deltas import StepDeltas
from tandem.engine.plan import SchedulerOutput
from tandem.engine.scheduler import Scheduler
from tandem.engine.sequence import Sequence
from tandem.engine.structured.compiler import GrammarCompiler, clean_message
from tandem.engine.structured.matcher import RequestGrammar
from tandem.engine.structured.rules import rules_for
from tandem.engine.structured.vocab import tokenizer_info
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
                 tokenizer: str | None = None) -> None:
        vocab_size = resolve_model_config(model).vocab_size
        vocab_of = tokenizer or model  # --tokenizer: the grammar's tokens are the ones prompts are made of
        self.words = -(-vocab_size // 32)  # int32 words per mask row
        self.stop_ids = sorted(eos_token_ids)
        self.eos_token_ids = eos_token_ids
        self.stop_set = frozenset(self.stop_ids)  # the matchers' stop tokens
        self.compiler = GrammarCompiler(lambda: tokenizer_info(vocab_of, vocab_size, eos_token_ids), threads)
        self.held: dict[str, tuple[Sequence, Future]] = {}  # waiting for their grammar, in arrival order
        self.fill_times: list[float] | None = None  # a list: seconds of each fill (the benchmark reads them)
        import xgrammar as xgr

        # threads fill the rows of plain grammars (an H100 host: 256 rows of a 128K vocabulary in 0.70 ms
        # on 4 threads, 0.83 on one, 1.05 row by row: benchmarks/RESULTS.md)
        self.batch_fill = xgr.BatchGrammarMatcher(max(1, min(4, (os.cpu_count() or 1) // 2)))

    # --- requests waiting for their grammar ----------------------------------------------------------
    def hold(self, seq: Sequence, scheduler: Scheduler) -> None:
        """Take a host-masked request: into the scheduler if it has no grammar or its grammar is ready,
        else held until it is."""
        if seq.request_id in self.held or seq.request_id in scheduler.requests:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        if seq.params.structured_outputs is None:
            seq.rules = rules_for(seq.params, None, self.words, self.eos_token_ids)
            scheduler.add(seq)
            return
        future = self.compiler.compile(seq.params.structured_outputs)
        if future.done() and future.exception() is None:  # compiled before: it runs like any other request
            self._start(seq, future, scheduler)
        else:
            self.held[seq.request_id] = (seq, future)

    def release(self, scheduler: Scheduler, deltas: StepDeltas) -> None:
        """Held requests whose compilation ended: into the scheduler's queue, or ended with its error."""
        for rid in [rid for rid, (_, future) in self.held.items() if future.done()]:
            seq, future = self.held.pop(rid)
            error = future.exception()
            if error is None:
                self._start(seq, future, scheduler)
            else:
                deltas.finished[rid] = "error"
                deltas.error_status[rid] = 400  # the InputProcessor parsed the spec: the compiler refused it
                deltas.errors[rid] = str(error) if isinstance(error, ValueError) else \
                    f"SamplingParams.structured_outputs cannot be compiled: {clean_message(error)}"

    def _start(self, seq: Sequence, future: Future, scheduler: Scheduler) -> None:
        grammar = RequestGrammar(future.result(), self.stop_ids)
        seq.rules = rules_for(seq.params, grammar, self.words, self.eos_token_ids)
        scheduler.add(seq)

    def wait(self, timeout: float) -> None:
        """Block until some held grammar is ready (or ``timeout``): for a loop with nothing else to do."""
        wait([future for _, future in self.held.values()], timeout, return_when=FIRST_COMPLETED)

    def drop(self, request_id: str) -> bool:
        """End a held request (aborted); False if it is not held."""
        return self.held.pop(request_id, None) is not None

    def drop_all(self) -> list[str]:
        ids = list(self.held)
        self.held.clear()
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
        """Step ``masked`` was processed: feed its masked requests their new tokens (plain grammars
        with one new token each, a decode step's usual case, in one call)."""
        batch: list[Sequence] = []
        for seq in masked.seqs:
            rules = seq.rules
            if rules is None:
                continue
            if seq.finished:  # by its tokens (EOS, length, a stop id) or an abort: done with the rules
                seq.rules = None
            elif rules.plain and len(seq.output_token_ids) == rules.num_accepted + 1:
                batch.append(seq)
            else:
                self._checked(seq, rules.advance(seq.output_token_ids), scheduler, deltas)
        if batch:
            self._advance_plain(batch, scheduler, deltas)

    def _advance_plain(self, batch: list[Sequence], scheduler: Scheduler, deltas: StepDeltas) -> None:
        """One new token each, in one call; a grammar can only terminate by taking a stop token."""
        import xgrammar as xgr

        tokens = [seq.output_token_ids[-1] for seq in batch]
        taken = xgr.BatchGrammarMatcher.batch_accept_token([seq.rules.grammar.matcher for seq in batch], tokens)
        stops = self.stop_set
        for seq, ok, token in zip(batch, taken, tokens):
            if ok:
                seq.rules.num_accepted += 1
                if token in stops or not stops:
                    self._checked(seq, None, scheduler, deltas)
            else:
                self._checked(seq, token, scheduler, deltas)

    def _checked(self, seq: Sequence, rejected: int | None, scheduler: Scheduler, deltas: StepDeltas) -> None:
        if rejected is not None:  # the mask forbade it: an engine fault, this request's alone
            self._end(seq, "error", scheduler, deltas, f"the grammar rejected token {rejected} at output "
                                                       f"index {seq.rules.num_accepted} (an engine fault)")
        elif seq.rules.terminated:  # it took a stop token (with ignore_eos the scheduler went on)
            self._end(seq, "stop", scheduler, deltas)

    @staticmethod
    def _end(seq: Sequence, reason: str, scheduler: Scheduler, deltas: StepDeltas, error: str = "",
             status: int = 500) -> None:
        seq.rules = None
        scheduler.finish(seq.request_id, reason)
        deltas.finished[seq.request_id] = reason
        if error:
            deltas.errors[seq.request_id] = error
            deltas.error_status[seq.request_id] = status

    def fill(self, masked: MaskedRows, scheduler: Scheduler, deltas: StepDeltas,
             out: np.ndarray | None = None) -> np.ndarray:
        """The step's mask, int32 [rows, words]: into ``out`` (the worker's buffer) or a new array
        (the worker may read it until the step is collected). A request whose rules leave no token
        ends here with an error."""
        start = time.perf_counter()
        mask = np.empty((len(masked.seqs), self.words), np.int32) if out is None else out
        plain: list[int] = []
        for i, (seq, gen_index) in enumerate(zip(masked.seqs, masked.gen_index)):
            rules = seq.rules
            if rules is None or seq.finished:
                mask[i] = -1  # it ended since the step was planned: its token is dropped
                continue
            if rules.num_accepted != gen_index:
                raise RuntimeError(f"request {seq.request_id!r}: its rules have seen {rules.num_accepted} "
                                   f"tokens, but the step samples its output index {gen_index}")
            if rules.plain:
                plain.append(i)
            elif not rules.fill(mask, i, gen_index):
                mask[i] = -1
                self._end(seq, "error", scheduler, deltas, no_token_left(seq, gen_index), 400)
        if plain:
            matchers = [masked.seqs[i].rules.grammar.matcher for i in plain]
            self.batch_fill.batch_fill_next_token_bitmask(matchers, mask, plain)
        masked.provided = True
        if self.fill_times is not None:
            self.fill_times.append(time.perf_counter() - start)
        return mask

    def shutdown(self) -> None:
        self.compiler.shutdown()


def no_token_left(seq: Sequence, gen_index: int) -> str:
    p = seq.params
    others = [name for name, on in (("allowed_token_ids", p.allowed_token_ids is not None), ("bad_words", p.bad_words
              or p.bad_words_token_ids), ("min_tokens", gen_index < p.min_tokens)) if on]
    rules = " or ".join(others) or "the other restrictions"
    if p.structured_outputs is None:  # bad words of several tokens, with allowed_token_ids
        return f"no token is left to sample at output index {gen_index}: {rules} rule out every token"
    return (f"no token is left to sample at output index {gen_index}: structured_outputs' grammar allows only "
            f"tokens that {rules} rule out")
