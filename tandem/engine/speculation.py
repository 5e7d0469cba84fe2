"""Speculative decoding on the engine's side: when a step speculates, and what each decoding
sequence proposes (docs/pipeline.md, "Speculative decoding").

A step speculates when few requests are running or waiting (``disable_by_batch_size``); its
decoding sequences then take proposals from the proposer. Requests whose sampling the host masks
(structured output, bad words of several tokens: ``SamplingParams.host_masked``) speculate too: the
host fills a mask row per proposal, each in the state after the known tokens and the proposals
before it (``engine.structured``), when those proposals are known on the host and the request's
rules can never leave a row without a token (``_masked_may``); otherwise they decode one token per
step in the same batches.

A speculating step is planned while the previous step runs, as any step (the device resolves what
that step accepted). The n-gram proposer's host proposes after a guess of that step's outcome; a
draft model proposes on the device as the first op of the verifying step (``on_device``: the host
plans with placeholders, ``plan`` adds the draft's part to the built step, ``processed`` puts the
device's proposals in the step's entries when it comes back).
A speculating step verifies k + 1 rows per sequence, so it costs more than a plain step: on
the H100 with the 8B model, 12% more at 1 sequence, 16% at 8, 29% at 32 (benchmarks/RESULTS.md,
measured without overlap). When the proposer finds nothing (n-gram lookup on text that does not
repeat), or what it proposed over the last ``JUDGE_WINDOW`` speculating sequence-steps gained less
than that (accepted tokens per sequence-step below ``break_even_gain``), speculation backs off: it
sits out 1, 2, 4 .. 16 steps, pipelined as without speculation, and tries again; a window that
gains enough resets it. The rule reads only the host's state when a step is planned, which is the
same in the sync and async loops (both process the same steps before planning each one), so both
decide alike; with overlap a speculating step's gain counts from the plan after it is processed,
one step later than without."""
from __future__ import annotations

import logging

from tandem.contract.step import StepInputs, StepOutput
from tandem.engine.scheduler import Scheduler, SchedulerOutput
from tandem.engine.sequence import Sequence
from tandem.engine.spec_path import SpecStats
from tandem.engine.structured.rows import speculation_safe
from tandem.spec.config import SpeculativeConfig
from tandem.spec.proposer import ProposalRequest, Proposer

log = logging.getLogger(__name__)

MAX_BACKOFF = 16  # most steps sat out after a step with nothing to propose
JUDGE_WINDOW = 16  # speculating sequence-steps whose gain decides whether to back off


def break_even_gain(busy: int) -> float:
    """Accepted proposals per speculating sequence-step below which a speculating step of ``busy``
    sequences costs more than it gains: its extra cost over a plain step, measured on the H100 for
    the 8B model with n-gram proposals (0.12 at 1 sequence, 0.29 at 32; a draft model adds its own
    forwards on top, so for it this is a lower bound)."""
    return 0.12 + 0.0055 * (max(busy, 1) - 1)


class Speculation:
    def __init__(self, config: SpeculativeConfig, proposer: Proposer) -> None:
        self.config, self.proposer = config, proposer
        # steps to sit out after the next empty proposal / the next window that did not pay (0: none
        # yet); a proposal resets the first, a window that pays the second
        self._backoff = {"empty": 0, "rejected": 0}
        self._sitting_out = 0  # steps left to sit out now
        self._window: tuple[int, int] | None = None  # (drafts, accepted) when the gain's window began
        schedule = ("planned while the previous step runs (overlapped: the device resolves what it accepted)"
                    if self.overlaps else "planned after the previous step is processed (no overlap of host and "
                    "device for them: the proposer reads known tokens only)")
        if self.on_device:
            schedule += "; the draft proposes on the device inside each verifying step"
        log.info("speculative decoding: %s, k = %d, off above %d requests; speculating steps are %s", config.method,
                 config.k, config.disable_by_batch_size, schedule)

    def wants(self, scheduler: Scheduler) -> bool:
        """Whether the next step speculates: decided from what the host knows before planning it
        (the same in the sync and async loops)."""
        self._judge(scheduler.spec_stats, scheduler.num_running + scheduler.num_waiting)
        if self._sitting_out:
            self._sitting_out -= 1
            return False
        busy = scheduler.num_running + scheduler.num_waiting
        return 0 < scheduler.num_running and busy <= self.config.disable_by_batch_size

    def _judge(self, stats: SpecStats, busy: int) -> None:
        """Once ``JUDGE_WINDOW`` speculating sequence-steps are processed (one step's, while backing
        off): back off if their proposals gained too little. A window, not each step, while it pays:
        one rejection says little."""
        need = 1 if self._backoff["rejected"] else JUDGE_WINDOW
        if self._window is None or stats.num_drafts - self._window[0] < need:
            return
        gain = (stats.num_accepted_tokens - self._window[1]) / (stats.num_drafts - self._window[0])
        self._window = None
        if gain < break_even_gain(busy):
            self._back_off("rejected")
        else:
            self._backoff["rejected"] = 0

    def _back_off(self, why: str) -> None:
        level = self._backoff[why]
        self._backoff[why] = min(2 * level, MAX_BACKOFF) if level else 1
        self._sitting_out = self._backoff[why]

    @property
    def overlaps(self) -> bool:
        """Whether a speculating step is planned while the previous step runs (a host proposer that
        takes a guess of the tokens in flight), else after every step in flight is processed."""
        return bool(getattr(self.proposer, "overlaps", False))

    def propose(self, scheduler: Scheduler) -> dict[str, list[int]]:
        """Proposals by request id for the running sequences that decode next: with every token known,
        or, for a proposer that overlaps, after a guess of what the step in flight produces."""
        requests, flights, rooms = [], [], []
        for seq in scheduler.running:
            flight = self._in_flight(seq)
            if flight is False:
                continue
            room = min(self.config.k, seq.max_new_tokens - seq.num_generated - 1)  # the drawn token counts too
            if room > 0:
                if self.on_device:  # placeholders: the device proposes after the real tokens in flight
                    flight = None
                ahead = 0 if flight is None else len(flight) + 1  # the guessed tokens before its own
                requests.append(ProposalRequest(seq.request_id, seq.prompt_token_ids + seq.output_token_ids,
                                                ahead + room, seq.num_pending))
                flights.append(flight)
                rooms.append(room)
        found = self.proposer.propose(requests) if requests else []
        proposals = {}
        for r, p, flight, room in zip(requests, found, flights, rooms):
            mine = _after_guess(p, flight, room)
            if mine:
                proposals[r.request_id] = mine
        if proposals:
            self._backoff["empty"] = 0
            if self._window is None:  # judged by what they gain once their steps are processed
                self._window = (scheduler.spec_stats.num_drafts, scheduler.spec_stats.num_accepted_tokens)
        elif requests:  # sequences that could have speculated, and nothing to propose
            self._back_off("empty")
        return proposals

    def _in_flight(self, seq: Sequence) -> list[int] | None | bool:
        """A decoding sequence's proposals in the step in flight ([] for a plain decode there; None:
        nothing in flight), or False if it does not speculate: host-masked requests that may not
        (``_masked_may``), a proposer that does not overlap while a step is in flight, and, in
        overlap, a request before ``min_tokens`` tokens are known (the step after this one would have
        only an upper bound of its rows' output index on the host, and the bans depend on it)."""
        if seq.num_tokens - seq.num_computed != 1 or (seq.params.host_masked and not self._masked_may(seq)):
            return False
        if self.overlaps and len(seq.output_token_ids) < seq.params.min_tokens:
            return False
        pending = seq.num_pending
        if not pending:
            return None
        flight = list(seq.proposed) if seq.spec_lag else []
        if not self.overlaps or pending != len(flight) + 1:  # (a lag of one step: nothing older is pending)
            return False
        return flight

    def _masked_may(self, seq: Sequence) -> bool:
        """A host-masked request speculates when its proposals are known on the host (the mask of each
        row after the first follows the proposals before it), its rows can never be left without a
        token (``speculation_safe``), and it is past ``min_tokens`` (whatever the proposer: before it,
        a row's stop-token bans can leave a completed grammar's row empty)."""
        return (not self.on_device and speculation_safe(seq.params)
                and len(seq.output_token_ids) >= seq.params.min_tokens)

    @property
    def on_device(self) -> bool:
        """Whether the proposals are made on the device by the step that verifies them (a draft
        model): the host plans with placeholders (``worker.draft_plan``)."""
        return bool(getattr(self.proposer, "on_device", False))

    def plan(self, step: StepInputs, sched: SchedulerOutput) -> StepInputs:
        """The built step with what an on-device proposer needs (unchanged for a host proposer)."""
        return self.proposer.plan(step, sched) if self.on_device and sched.speculative else step

    def processed(self, sched: SchedulerOutput, output: StepOutput) -> None:
        """Before a step's tokens are taken in: an on-device proposer's real proposals replace the
        placeholders of its entries (the host's acceptance and counters need them)."""
        if self.on_device and sched.speculative:
            self.proposer.processed(sched, output)

    def ended(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.proposer.release(rid)


def _after_guess(found: list[int], flight: list[int] | None, room: int) -> list[int]:
    """Up to ``room`` proposals from the proposer's continuation ``found`` of the known tokens. With a
    step in flight the host guesses its outcome from that continuation too: the step accepts its
    proposals ``flight`` as far as they agree with it, draws its next token, and the proposals go on
    after that draw. (After a step that rejected, the one in flight was planned on a wrong guess; the
    continuation of the known tokens puts the next guess right again.)"""
    if flight is None:
        return found[:room]
    accepted = next((i for i, (x, y) in enumerate(zip(flight, found)) if x != y), len(flight))
    return found[accepted + 1:accepted + 1 + room]
