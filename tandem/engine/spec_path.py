"""The scheduler's side of speculative decoding: plan a speculating sequence's step, and take in the
tokens its sampled rows drew (docs/pipeline.md, "Speculative decoding").

A speculating sequence computes its last known token and its k' proposals in one step and samples
at each of those k' + 1 positions, with the noise of the output index each position would have
without speculation. Verification is an exact match: the proposals up to the first one that differs
from the token drawn at its position are accepted, and the draw at that position (or after the
last proposal, the bonus token) follows them. A drawn token is what the non-speculative run draws
at that index from the same tokens before it, so the output is the same token for token, greedy or
seeded; for a deterministic proposal (q one-hot) this is rejection sampling's rule (accept with
probability p(x), otherwise a draw from p without x), coupled through the shared noise.

Scheduling is optimistic, as for one token: every proposal counts as accepted (pending) until the
output is processed, which then rolls the counters back by what was rejected. The engine plans the
next step on top of a speculating one before processing it (either proposer; a draft model's
proposals are placeholders here until the step comes back, ``Speculation.processed``): that step's
entries for the speculating sequences are marked ``lagged``, and the device shifts their positions,
slots, context lengths and output indices back by the rejected count, which it knows
(``worker.spec_lag``)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tandem.contract.step import Logprobs
from tandem.engine.block_manager import BlockManager
from tandem.engine.deltas import StepDeltas
from tandem.engine.plan import ScheduledSeq
from tandem.engine.sequence import Sequence, SeqStatus


@dataclass
class SpecStats:
    """Since start, over the speculating sequence-steps (vLLM's counters)."""

    num_drafts: int = 0  # sequence-steps that verified proposals
    num_draft_tokens: int = 0  # proposals verified
    num_accepted_tokens: int = 0  # proposals accepted

    @property
    def acceptance_rate(self) -> float | None:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    @property
    def tokens_per_step(self) -> float | None:
        """Mean tokens a speculating sequence gained per step (accepted proposals + the drawn one)."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else None


def accepted_count(drawn: np.ndarray, proposals: list[int]) -> int:
    """How many leading proposals equal the tokens drawn at their positions."""
    k = len(proposals)
    mismatch = np.flatnonzero(drawn[:k] != np.asarray(proposals, np.int64))
    return int(mismatch[0]) if mismatch.size else k


class SpecPath:
    """A mixin of ``Scheduler``, which defines the rest."""

    spec_stats: SpecStats
    blocks: BlockManager

    def grow(self, seq: Sequence, num_tokens: int) -> None: ...
    def make_room(self, seq: Sequence, num_tokens: int) -> bool: ...
    def accept_token(self, seq: Sequence, token: int, logprobs: Logprobs | None, row: int,
                     deltas: StepDeltas) -> None: ...

    def speculation_size(self, seq: Sequence, proposals: list[int], budget: int) -> int:
        """Tokens a speculating sequence computes this step: its last one and the proposals that the
        token budget and the free blocks leave room for (blocks for all of them: the worst case);
        proposals never preempt anyone, only its one token may, as without speculation. 0 when it
        cannot grow now."""
        # the draw after the last proposal is an output token too: at most max_new_tokens in all
        n = min(1 + len(proposals), budget, seq.max_new_tokens - seq.num_generated)
        while n > 1 and not self._fits(seq, seq.num_computed + n):
            n -= 1
        return n if self.make_room(seq, seq.num_computed + n) else 0

    def _fits(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks.can_grow(seq.block_ids, num_tokens)

    def accept_proposals(self, item: ScheduledSeq, step_id: int, drawn: np.ndarray, logprobs: Logprobs | None,
                         row: int, deltas: StepDeltas) -> None:
        """A speculating entry's sampled rows ``row``.. came back with ``drawn``: its accepted
        proposals and the token drawn after them join its output, one by one through the usual stop
        checks (a stop ends it mid-run, exactly where the non-speculative run ends).

        The counters move back by what was rejected, relative to where they are: the next step may
        already be planned on top of this one (assuming every proposal accepted), and the device
        shifted that step's positions back by the same count (``spec_lag``)."""
        seq, proposals = item.seq, item.proposals
        accepted = accepted_count(drawn, proposals)
        rejected = len(proposals) - accepted
        stats = self.spec_stats
        stats.num_drafts += 1
        stats.num_draft_tokens += len(proposals)
        stats.num_accepted_tokens += accepted
        if seq.status is SeqStatus.RUNNING:
            # first: K/V is right up to the last accepted proposal; the drawn token after it is
            # computed by the next step (what a filled block may register counts only up to here)
            seq.num_computed -= rejected
            if seq.last_step == step_id:  # nothing planned on top of it: the next step is not lagged
                seq.spec_lag = False
        taken = 0
        for j, token in enumerate(drawn[:accepted + 1].tolist()):
            if seq.finished:
                break
            self.accept_token(seq, token, logprobs, row + j, deltas)
            taken += 1
        seq.num_pending -= len(proposals) + 1 - taken  # the rejected proposals were counted as pending
