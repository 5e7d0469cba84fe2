"""The rows of a step that host token rules mask (``manager``'s view of a planned step)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tandem.engine.plan import SchedulerOutput
from tandem.engine.sequence import Sequence
from tandem.sampling_params import SamplingParams


@dataclass
class MaskedRows:
    """A step's host-masked sampled rows, ascending; its mask's row i is for ``seqs[i]``."""

    sample_index: np.ndarray  # int64: which of the step's sampled rows (the ``mask_sample`` field)
    seqs: list[Sequence]
    #: the output index each row samples: its rules must have seen that many tokens (with the proposals
    #: before it); planned as if the step before accepted all its proposals (``resolve`` makes it exact)
    gen_index: list[int]
    #: per row, the proposals before it in its step (a speculating sequence's rows after its first)
    ahead: list[tuple[int, ...]] = field(default_factory=list)
    lagged: list[bool] = field(default_factory=list)  # per row: the step before speculated for its sequence
    sent: bool = False  # its fill began (``begin_fill``)
    provided: bool = False  # the mask is ready for the worker (``mask_ready``)


def masked_rows(sched: SchedulerOutput) -> MaskedRows | None:
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
    ahead: list[tuple[int, ...]] = [()] * len(seqs)
    lagged = [False] * len(seqs) if d is None or d.lagged is None else d.lagged[index].tolist()
    for item in sched.chunks:
        if item.sample and item.seq.params.host_masked:
            proposals = tuple(item.proposals or ())
            for j in range(item.num_samples):  # a speculating sequence: one row per proposal, and the next
                index.append(first + j)
                seqs.append(item.seq)
                gen.append(item.gen_index + j)
                ahead.append(proposals[:j])
                lagged.append(item.lagged)
        first += item.num_samples
    return MaskedRows(np.array(index, np.int64), seqs, gen, ahead, lagged) if seqs else None


def resolved_gen_index(seq: Sequence, gen_index: int, ahead: tuple[int, ...]) -> int:
    """The output index a lagged row samples: planned as if the step before accepted every proposal,
    it follows the tokens that step did accept (processed by now), and the proposals before it."""
    resolved = len(seq.output_token_ids) + len(ahead)
    if gen_index < resolved:  # (the proposals that step rejected, or none)
        raise RuntimeError(f"request {seq.request_id!r}: a row planned at output index {gen_index} "
                           f"follows {len(seq.output_token_ids)} known tokens")
    return resolved


def speculation_safe(params: SamplingParams) -> bool:
    """Whether a host-masked request's rows can never be left without a token, so it may speculate:
    a row past the accepted run (masked after proposals that were not drawn) must not end the
    request. A grammar alone always leaves a token (a continuation or a stop token), and so does
    everything but a grammar or an allowlist; fixed bans on top of either can clear a row."""
    bans = bool(params.bad_words or params.bad_words_token_ids)
    if params.structured_outputs is None:
        return params.allowed_token_ids is None
    return params.allowed_token_ids is None and not bans


def no_token_left(seq: Sequence, gen_index: int) -> str:
    p = seq.params
    others = [name for name, on in (("allowed_token_ids", p.allowed_token_ids is not None), ("bad_words", p.bad_words
              or p.bad_words_token_ids), ("min_tokens", gen_index < p.min_tokens)) if on]
    rules = " or ".join(others) or "the other restrictions"
    if p.structured_outputs is None:  # bad words of several tokens, with allowed_token_ids
        return f"no token is left to sample at output index {gen_index}: {rules} rule out every token"
    return (f"no token is left to sample at output index {gen_index}: structured_outputs' grammar allows only "
            f"tokens that {rules} rule out")
