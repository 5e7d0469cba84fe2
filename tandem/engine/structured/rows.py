"""The rows of a step that host token rules mask (``manager``'s view of a planned step)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tandem.engine.plan import SchedulerOutput
from tandem.engine.sequence import Sequence


@dataclass
class MaskedRows:
    """A step's host-masked sampled rows, ascending; its mask's row i is for ``seqs[i]``."""

    sample_index: np.ndarray  # int64: which of the step's sampled rows (the ``mask_sample`` field)
    seqs: list[Sequence]
    gen_index: list[int]  # the output index each row samples: its rules must have seen that many tokens
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
    for item in sched.chunks:
        if item.sample:
            if item.seq.params.host_masked:
                index.append(first)
                seqs.append(item.seq)
                gen.append(item.gen_index)
            first += item.num_samples  # a speculating sequence (never a masked one) samples several
    return MaskedRows(np.array(index, np.int64), seqs, gen) if seqs else None


def no_token_left(seq: Sequence, gen_index: int) -> str:
    p = seq.params
    others = [name for name, on in (("allowed_token_ids", p.allowed_token_ids is not None), ("bad_words", p.bad_words
              or p.bad_words_token_ids), ("min_tokens", gen_index < p.min_tokens)) if on]
    rules = " or ".join(others) or "the other restrictions"
    if p.structured_outputs is None:  # bad words of several tokens, with allowed_token_ids
        return f"no token is left to sample at output index {gen_index}: {rules} rule out every token"
    return (f"no token is left to sample at output index {gen_index}: structured_outputs' grammar allows only "
            f"tokens that {rules} rule out")
