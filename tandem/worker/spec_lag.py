"""Speculative decoding overlapped with the host (docs/pipeline.md, "Speculative decoding"): what the
device keeps of a speculating step, and how the next step's inputs are resolved from it.

The host plans step N+1 while step N, which verifies proposals for some sequences, still runs: it
assumes every proposal accepted, so for such a sequence (``spec_lag`` = 1 in step N+1) its positions,
KV slots, context length and sampled rows' output indices are too far by the proposals that step N
rejects, which only the device knows. Step N's sampling stage writes, per row of the next-token
table, the token drawn after the accepted run (the next step's input, through the usual
placeholder) and the rejected count (``record``); step N+1's first op shifts its lagged sequences back
by that count and takes their slots from the block table again (``resolve``). Both are fixed-shape
device ops with no host read, outside any captured graph (``resolve`` runs before a graph's inputs
are staged; ``record`` in the eager sampling stage). With a draft model ``record`` also keeps each
row's draws in order (``draws``): the draft's window for the next step reads the accepted
proposals and the draw after them there (``worker.draft_window``)."""
from __future__ import annotations

from typing import Any

import torch

from tandem.contract.step import StepShape


class SpecLag:
    ROW_BYTES = 8  # device memory per row of the next-token table (its rejected count)

    def __init__(self, num_rows: int, device: torch.device) -> None:
        # per row: proposals that the newest speculating step including it rejected
        self.rejected = torch.zeros(num_rows, dtype=torch.int64, device=device)
        # with a draft model: per row, the speculating step's draws in order (the accepted proposals
        # and the draw after them begin it), the draft's window for the next step (``worker.draft_window``)
        self.draws: torch.Tensor | None = None

    def keep_draws(self, width: int) -> None:
        """Keep each row's first ``width`` draws of a speculating step (a draft of k proposals: k + 1)."""
        self.draws = torch.zeros(self.rejected.numel(), width, dtype=torch.int64, device=self.rejected.device)

    def record(self, next_tokens: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor,
               drafts: torch.Tensor) -> None:
        """A speculating step's draws ``tokens`` (sampled rows in step order, a sequence's rows
        together, into table rows ``rows``; ``drafts``: the proposal each verifies, -1: none): each
        row's first draw that differs from its proposal is its last token; the rows after it were
        rejected. Every sampled row of a sequence writes the same values, so the duplicates agree."""
        n = tokens.numel()
        index = torch.arange(n, device=tokens.device)
        table = next_tokens.numel()
        # the last row of each sequence verifies nothing (-1): every sequence has a first mismatch
        first = torch.full((table,), n, dtype=torch.int64, device=tokens.device)
        first.scatter_reduce_(0, rows, torch.where(tokens != drafts, index, n), "amin")
        last = torch.full((table,), -1, dtype=torch.int64, device=tokens.device)
        last.scatter_reduce_(0, rows, index, "amax")
        mine = first[rows]
        next_tokens.index_copy_(0, rows, tokens[mine])
        self.rejected.index_copy_(0, rows, last[rows] - mine)
        if self.draws is not None:  # a sequence's sampled rows are together: j counts from its first
            begin = torch.full((table,), n, dtype=torch.int64, device=tokens.device)
            begin.scatter_reduce_(0, rows, index, "amin")
            j = (index - begin[rows]).clamp(max=self.draws.shape[1] - 1)
            self.draws[rows, j] = tokens

    def resolve(self, f: Any, shape: StepShape, block_size: int) -> None:
        """Shift the lagged sequences' fields of a step back, in place in ``f`` (``StepTensors`` of a
        copy of its packed inputs: the host's buffer stays as it was)."""
        n, qs = shape.num_seqs, f.query_start
        shift = self.rejected[f.seq_rows] * f.spec_lag  # per sequence
        ends = qs[1:].contiguous()
        token = torch.arange(shape.num_tokens, device=qs.device)
        seq_of = torch.searchsorted(ends, token, right=True).clamp(max=n - 1)
        # tokens past the last sequence pad a piecewise graph's bucket: they stay as they are
        moved = torch.where(token < qs[n], shift[seq_of], 0)
        positions = f.positions - moved
        table = f.block_tables.view(n, shape.max_blocks)
        slots = table[seq_of, positions // block_size] * block_size + positions % block_size
        f.slot_mapping.copy_(torch.where(moved > 0, slots, f.slot_mapping))
        f.positions.copy_(positions)
        f.seq_lens.sub_(shift)
        sample_seq = torch.searchsorted(ends, f.logits_indices, right=True).clamp(max=n - 1)
        f.gen_index.sub_(shift[sample_seq])
