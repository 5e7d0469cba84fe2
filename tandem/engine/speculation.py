"""Speculative decoding on the engine's side: when a step speculates, and what each decoding
sequence proposes (docs/pipeline.md, "Speculative decoding").

A step speculates when few requests are running or waiting (``disable_by_batch_size``); its
decoding sequences then take proposals from the proposer. Requests whose sampling the host masks
(structured output, bad words of several tokens: ``SamplingParams.host_masked``) never speculate:
their mask for a position depends on the tokens before it, which the mask path knows one step at a
time. They decode one token per step in the same batches."""
from __future__ import annotations

import logging

from tandem.engine.scheduler import Scheduler
from tandem.spec.config import SpeculativeConfig
from tandem.spec.proposer import ProposalRequest, Proposer

log = logging.getLogger(__name__)


class Speculation:
    def __init__(self, config: SpeculativeConfig, proposer: Proposer) -> None:
        self.config, self.proposer = config, proposer
        log.info("speculative decoding: %s, k = %d, off above %d requests; speculating steps are planned after "
                 "the previous step is processed (no overlap of host and device for them)", config.method, config.k,
                 config.disable_by_batch_size)

    def wants(self, scheduler: Scheduler) -> bool:
        """Whether the next step speculates: decided from what the host knows before planning it
        (the same in the sync and async loops)."""
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
        if not requests:
            return {}
        found = self.proposer.propose(requests)
        return {r.request_id: p[:r.max_proposals] for r, p in zip(requests, found) if p}

    def ended(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.proposer.release(rid)
