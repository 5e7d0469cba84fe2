"""The host's side of a draft model that proposes on the device (``worker.draft_window``): which
requests may take draft proposals in the step being planned, what the step's draft part holds, and
what the host learns when the step is processed (docs/pipeline.md, "Speculative decoding").

The draft proposes inside the step that verifies its proposals, so the host plans that step while
the previous one runs, as for any step: it asks for k' placeholder proposals per speculating
sequence (a draft always makes as many as asked) and the device writes the real ones in. The host
keeps the draft cache's block lists (its own, not the target's: the caches differ in shape, and the
target's blocks are shared and freed by rules the draft need not follow), reserved for the worst
case (every proposal in flight accepted), and per request how far the cache holds the K/V of real
tokens (``valid``), so that a step carries a catch-up of the known tokens the cache lacks below the
window. K/V written at rejected positions is rewritten before it is read: the next window starts at
or below what is valid, and every forward writes its positions before its attention reads them."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from tandem.contract.draft import DraftShape
from tandem.contract.step import StepInputs, StepOutput
from tandem.worker.draft_blocks import DraftBlocks
from tandem.worker.draft_graphs import DraftGraphs


@dataclass
class _Held:
    blocks: list[int] = field(default_factory=list)
    valid: int = 0  # positions below hold the K/V of the real tokens (as of its processed calls)
    call: int | None = None  # step id of its newest call, until that step is processed


@dataclass
class _Rows:
    """The step's draft part being laid out, by name (``DraftShape.parts``)."""

    parts: dict[str, list] = field(default_factory=lambda: {name: [] for name, _ in DraftShape(0, 0, 0, 0).parts})
    blocks: list[list[int]] = field(default_factory=list)  # each draft row's draft blocks
    chunk_blocks: list[list[int]] = field(default_factory=list)  # each catch-up chunk's
    lengths: list[int] = field(default_factory=list)  # each catch-up chunk's tokens

    def add(self, **values) -> None:
        for name, value in values.items():
            self.parts[name].extend(value)


class DraftPlanner:
    overlaps = True  # planned while the previous step runs: the device reads what that step drew
    on_device = True  # proposals are placeholders on the host, made on the device (``plan``)

    def __init__(self, k: int, num_blocks: int, block_size: int, graphs: DraftGraphs | None = None) -> None:
        self.k, self.block_size = k, block_size
        self.graphs = graphs  # the device side's proposal graphs (CUDA), for tools that count the captured ones
        self.blocks = DraftBlocks(num_blocks, block_size)
        self.seqs: dict[str, _Held] = {}

    def propose(self, requests: list) -> list[list[int]]:
        """Placeholders (``tandem.spec.proposer.ProposalRequest``s -> ``max_proposals`` zeros each) for
        the requests the draft serves this step: those that know at least k + 1 tokens (the window)
        and for which the draft cache has blocks for the worst case."""
        out = []
        for r in requests:
            held = self.seqs.setdefault(r.request_id, _Held())
            n = len(r.tokens) + r.in_flight  # as the host plans it: every proposal in flight accepted
            ok = len(r.tokens) > self.k and self.blocks.reserve(held.blocks, n - 1 + r.max_proposals)
            out.append([0] * r.max_proposals if ok else [])
        return out

    def release(self, request_id: str) -> None:
        held = self.seqs.pop(request_id, None)
        if held is not None:  # a step in flight may still write them: the device runs steps in order
            self.blocks.release(held.blocks)

    def plan(self, step: StepInputs, sched) -> StepInputs:
        """The step with its draft part (``DraftShape``) for its entries with proposals."""
        k = self.k
        rows = _Rows()
        seq_index = len(sched.decode) if sched.decode is not None else 0
        token = sample = seq_index  # a decode entry: one token, one sampled row
        for item in sched.chunks:
            if item.proposals:
                seq, held, kk = item.seq, self.seqs[item.seq.request_id], len(item.proposals)
                known = seq.prompt_len + len(seq.output_token_ids)
                # its newest call in flight computed through its first position, known - 1
                valid = known if held.call is not None else held.valid
                below = item.start - k  # the window starts here or lower (host: all accepted)
                if valid < below:
                    self._catch_up(rows, held, seq.known_tokens(valid, below), valid)
                held.call = sched.step_id
                r = len(rows.blocks)
                rows.add(seq=[seq_index], sample=[sample], known=[known], kk=[kk],
                         tail=seq.known_tokens(known - k - 1, known), write_token=range(token + 1, token + 1 + kk),
                         write_sample=range(sample, sample + kk), write_from=range(r * k, r * k + kk))
                rows.blocks.append(held.blocks)
            seq_index += 1
            token += item.num_tokens
            sample += item.num_samples
        if not rows.blocks:
            return step
        width = max(map(len, rows.blocks))
        parts = rows.parts
        parts["table"] = _table(rows.blocks, width)
        if rows.lengths:
            parts["cu_table"] = _table(rows.chunk_blocks, width)
            parts["cu_query_start"] = np.concatenate([[0], np.cumsum(rows.lengths)])
        shape = DraftShape(len(rows.blocks), k, width, len(parts["write_token"]), len(parts["cu_ids"]),
                           len(rows.lengths), max(rows.lengths, default=0))
        data = np.concatenate([np.asarray(parts[name], np.int64).ravel() for name, _ in shape.parts])
        assert data.size == shape.num_words
        return StepInputs(step.step_id, replace(step.shape, **shape.step_fields()), step.sampler,
                          np.concatenate([step.data, data]))

    def _catch_up(self, rows: _Rows, held: _Held, tokens: list[int], first: int) -> None:
        """A chunk of known tokens at positions ``first``.. for the draft's cache (before the window)."""
        bs, n = self.block_size, len(tokens)
        pos = np.arange(first, first + n)
        blocks = np.asarray(held.blocks, np.int64)
        rows.add(cu_ids=tokens, cu_pos=pos, cu_slots=blocks[pos // bs] * bs + pos % bs, cu_seq_lens=[first + n])
        rows.chunk_blocks.append(held.blocks)
        rows.lengths.append(n)

    def processed(self, sched, output: StepOutput) -> None:
        """Step ``sched`` came back (before the scheduler takes its tokens in): its entries' proposals
        are the device's, and each call tells how far the draft cache now holds real K/V (its window
        through the first position, then its fed-back drafts as far as they were accepted)."""
        if output.draft_tokens is None:
            return
        row = len(sched.decode) if sched.decode is not None else 0
        for item in sched.chunks:
            if item.proposals:
                kk = len(item.proposals)
                item.proposals = output.draft_tokens[row:row + kk].tolist()
                held = self.seqs.get(item.seq.request_id)
                if held is not None and held.call == sched.step_id:
                    drawn = np.asarray(output.token_ids[row:row + kk])
                    miss = np.flatnonzero(drawn != np.asarray(item.proposals))
                    accepted = int(miss[0]) if miss.size else kk
                    seq = item.seq
                    held.valid = seq.prompt_len + len(seq.output_token_ids) + min(accepted, kk - 1)
                    held.call = None
            row += item.num_samples


def _table(blocks: list[list[int]], width: int) -> np.ndarray:
    table = np.zeros((len(blocks), width), np.int64)
    for i, row in enumerate(blocks):
        table[i, :len(row)] = row
    return table
