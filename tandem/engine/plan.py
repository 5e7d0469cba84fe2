"""What the scheduler decided for one step: its pure-decode entries as one ``DecodeBlock`` of arrays,
and its other entries (prefill chunks, speculating sequences, anything unusual) one ``ScheduledSeq`` each. The batch builder
lays out the decode block first, then the chunks, in order; sampled rows come back in that order."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tandem.engine.running import RunningState
from tandem.engine.sequence import Sequence


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    start: int  # first position computed in this step
    num_tokens: int
    sample: bool  # the chunk reaches the end of the sequence, so a token is sampled
    gen_index: int  # index in the output of the token sampled (seeds the sampler's noise)
    plp_start: int = 0  # prompt positions [plp_start, plp_stop) whose next token's logprobs this step returns
    plp_stop: int = 0
    #: tokens before ``start`` that no step computes for this admission: the prefix cache had them
    #: (only on a sequence's first chunk after admission; 0 otherwise)
    num_cached: int = 0
    #: speculative decoding: the proposed tokens after the sequence's last one (computed in this step
    #: after it, each position sampled: 1 + len(proposals) sampled rows); None: no speculation
    proposals: list[int] | None = None
    #: its previous step, not processed when this one was planned, verified proposals for it: the
    #: device shifts its positions back by the proposals that step rejected (``spec_lag``)
    lagged: bool = False

    @property
    def num_samples(self) -> int:
        """Sampled rows of this entry: 0, 1, or 1 + its proposals."""
        return 0 if not self.sample else 1 + (len(self.proposals) if self.proposals else 0)


@dataclass
class DecodeBlock:
    """Pure-decode entries (one token each, each sampled), as arrays in step order."""

    seqs: list[Sequence]
    rows: np.ndarray
    starts: np.ndarray  # position of the token each computes
    gen_index: np.ndarray  # output index of the token each samples
    pending: np.ndarray  # > 0: the input token is still on the device (a placeholder)
    tags: np.ndarray  # the rows' admissions when scheduled: a row that changed hands since is skipped
    state: RunningState
    lagged: np.ndarray | None = None  # bool: as ``ScheduledSeq.lagged`` (None: none is)

    def __len__(self) -> int:
        return len(self.seqs)


@dataclass
class SchedulerOutput:
    step_id: int
    chunks: list[ScheduledSeq] = field(default_factory=list)
    decode: DecodeBlock | None = None

    def __len__(self) -> int:
        """Sequences in the step."""
        return len(self.chunks) + (len(self.decode) if self.decode is not None else 0)

    @property
    def num_tokens(self) -> int:
        return sum(item.num_tokens for item in self.chunks) + (len(self.decode) if self.decode is not None else 0)

    @property
    def speculative(self) -> bool:
        """Whether some entry verifies proposals (its accepted counts are known on the host only once
        its output is processed: a step planned on top of it before then resolves them on the device,
        and one with a draft proposer is planned after it is processed)."""
        return any(item.proposals for item in self.chunks)

    @property
    def items(self) -> list[ScheduledSeq]:
        """Every entry as a ``ScheduledSeq``, in step order (per-sequence objects: for tests and tools,
        not for the step loop)."""
        d = self.decode
        decodes = [] if d is None else [ScheduledSeq(s, int(p), 1, True, int(g))
                                        for s, p, g in zip(d.seqs, d.starts, d.gen_index)]
        return decodes + self.chunks
