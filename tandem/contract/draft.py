"""A draft model's part of a step (docs/pipeline.md, "Speculative decoding"): the layout of the
words that follow a step's packed fields when a draft model proposes on the device (``StepShape``
carries its sizes as ``draft_*`` fields)."""
from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class DraftShape:
    """A draft model's part of a step (docs/pipeline.md, "Speculative decoding"): int64 words that
    follow the packed fields in ``StepInputs.data``, for the proposals the draft makes on the device
    before the step's forward. Its parts, in order (``parts``): per draft row (a speculating
    sequence), the step's sequence index (``seq``), its first sampled row (``sample``), the tokens the
    host knew when it planned the step (``known``), the proposals it keeps (``kk``, <= ``k``), the
    last k + 1 known tokens (``tail``) and its draft block table (``table``, ``width`` columns); per
    proposal written into the step, its flat token (``write_token``), sampled row (``write_sample``)
    and index in the drafts [rows, k] (``write_from``); then the catch-up forward of known tokens the
    draft's cache lacks below the window (ids, positions, slots per token; query starts, context
    lengths and a block table per chunk)."""

    rows: int
    k: int
    width: int  # draft block-table columns
    writes: int  # proposals written into the step: the rows' kk summed
    catchup_tokens: int = 0
    catchup_chunks: int = 0
    catchup_max_q: int = 0  # longest catch-up chunk (a host value the attention takes as a shape)

    @property
    def parts(self) -> tuple[tuple[str, int], ...]:
        r, c = self.rows, self.catchup_chunks
        return (("seq", r), ("sample", r), ("known", r), ("kk", r), ("tail", r * (self.k + 1)),
                ("table", r * self.width), ("write_token", self.writes), ("write_sample", self.writes),
                ("write_from", self.writes), ("cu_ids", self.catchup_tokens), ("cu_pos", self.catchup_tokens),
                ("cu_slots", self.catchup_tokens), ("cu_query_start", c + 1 if c else 0), ("cu_seq_lens", c),
                ("cu_table", c * self.width))

    @property
    def num_words(self) -> int:
        return sum(size for _, size in self.parts)

    def step_fields(self) -> dict[str, int]:
        """As ``StepShape``'s ``draft_*`` fields (a step's shape is plain ints: it crosses to other
        ranks as a header of words)."""
        return {"draft_" + f.name: getattr(self, f.name) for f in fields(DraftShape)}
