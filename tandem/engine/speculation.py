"""Speculative decoding on the engine's side: when a step speculates, and what each decoding
sequence proposes (docs/pipeline.md, "Speculative decoding").

A step speculates when few requests are running or waiting (``disable_by_batch_size``); its
decoding sequences then take proposals from the proposer. Requests whose sampling the host masks
(structured output, bad words of several tokens: ``SamplingParams.host_masked``) never speculate:
their mask for a position depends on the tokens before it, which the mask path knows one step at a
time. They decode one token per step in the same batches.

A speculating step is planned after the device has finished everything before it (no overlap), so
when the proposer finds nothing (n-gram lookup on text that does not repeat), speculation backs off:
after a step with no proposals it sits out 1, 2, 4 .. 16 steps, pipelined as without speculation,
and tries again; any proposal resets it. The rule reads only the host's state, as the rest."""
from __future__ import annotations

import logging

from tandem.engine.scheduler import Scheduler
from tandem.spec.config import SpeculativeConfig
from tandem.spec.proposer import ProposalRequest, Proposer

log = logging.getLogger(__name__)

MAX_BACKOFF = 16  # most steps sat out after a step with nothing to propose


class Speculation:
    def __init__(self, config: SpeculativeConfig, proposer: Proposer) -> None:
        self.config, self.proposer = config, proposer
        self._backoff = 0  # steps to sit out after the next empty proposal (0: none yet)
        self._sitting_out = 0  # steps left to sit out now
        log.info("speculative decoding: %s, k = %d, off above %d requests; speculating steps are planned after "
                 "the previous step is processed (no overlap of host and device for them)", config.method, config.k,
                 config.disable_by_batch_size)

    def wants(self, scheduler: Scheduler) -> bool:
        """Whether the next step speculates: decided from what the host knows before planning it
        (the same in the sync and async loops)."""
        if self._sitting_out:
            self._sitting_out -= 1
            return False
        busy = scheduler.num_running + scheduler.num_waiting
        return 0 < scheduler.num_running and busy <= self.config.disable_by_batch_size

    def propose(self, scheduler: Scheduler) -> dict[str, list[int]]:
        """Proposals by request id for the running sequences that decode next with every token known."""
        requests = []
        for seq in scheduler.running:
            if seq.params.host_masked or seq.num_pending or seq.num_tokens - seq.num_computed != 1:
                continue
            room = min(self.config.k, seq.max_new_tokens - seq.num_generated - 1)  # the drawn token counts too
            if room > 0:
                requests.append(ProposalRequest(seq.request_id, seq.prompt_token_ids + seq.output_token_ids, room))
        found = self.proposer.propose(requests) if requests else []
        proposals = {r.request_id: p[:r.max_proposals] for r, p in zip(requests, found) if p}
        if proposals:
            self._backoff = 0
        elif requests:  # sequences that could have speculated, and nothing to propose
            self._backoff = min(2 * self._backoff, MAX_BACKOFF) if self._backoff else 1
            self._sitting_out = self._backoff
        return proposals

    def ended(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.proposer.release(rid)
