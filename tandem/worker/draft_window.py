"""The draft model's proposals made on the device, as the first op of the step that verifies them
(docs/pipeline.md, "Speculative decoding"), so a speculating step is planned while the previous one
runs, as with the n-gram proposer.

The host plans step N+1 while N runs, with k' placeholder proposals per speculating sequence (a draft
always proposes as many as the host asks), and sends what it knows in the step's draft part
(``contract.step.DraftShape``): each row's last k + 1 known tokens, how many it knew, its draft block
table, where the proposals go, and the known tokens the draft's cache lacks below the window. On the
device, after the lagged sequences were resolved (``spec_lag.resolve``):

- a catch-up forward of those known tokens, if any (eager, varlen: a prompt, or a request that sat
  out steps);
- the window (``window``): each row's last k + 1 tokens of the real sequence, ending at the step's
  resolved first position. Positions the host knew come from the known tail; the ones after it are
  step N's draws for that sequence (``SpecLag.draws``: its accepted proposals, then the draw after
  them), the last being the step's own resolved input token. This is the window the drained path
  reads off the known tokens once N is processed (``tests/test_draft_overlap.py``);
- ``uniform_drafts`` on it (a CUDA graph per bucket where captured), and the k' proposals of each row
  written into the step's input ids after its first token and into ``draft_token`` of its sampled
  rows, which ``record`` verifies against and the step's output returns to the host.

Everything here has shapes fixed by the step's shape and reads nothing back on the host."""
from __future__ import annotations

import torch

from tandem.contract.draft import DraftShape
from tandem.model.attention import AttentionInputs, step_attention
from tandem.worker.draft_graphs import DraftGraphs, DraftModel, uniform_drafts


def draft_part(data: torch.Tensor, offset: int, shape: DraftShape) -> dict[str, torch.Tensor]:
    """Views of the step's draft part (``DraftShape.parts``), which starts at word ``offset``."""
    out = {}
    for name, size in shape.parts:
        out[name] = data[offset:offset + size]
        offset += size
    return out


def window(p: dict[str, torch.Tensor], k: int, first_position: torch.Tensor, first_id: torch.Tensor,
           draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each draft row's last k + 1 real tokens -> (ids [R, k+1], the first one's position [R]).

    ``first_position`` / ``first_id``: the row's first token in the step (resolved position, resolved
    input token); ``draws``: its rows of ``SpecLag.draws``. A position below ``known`` the host knew
    (the tail's last token sits at known - 1); one after it and before the step's first token is the
    previous step's draw j = position - known (accepted proposals equal their draws)."""
    known = p["known"]
    pos = first_position[:, None] - k + torch.arange(k + 1, device=known.device)
    tail = p["tail"].view(-1, k + 1).gather(1, (pos - known[:, None] + k + 1).clamp(0, k))
    drawn = draws.gather(1, (pos - known[:, None]).clamp(0, draws.shape[1] - 1))
    ids = torch.where(pos < known[:, None], tail, torch.where(pos == first_position[:, None], first_id[:, None], drawn))
    return ids, first_position - k


class DeviceDraft:
    """The draft model on the worker: its model and cache (``DraftModel``), its graphs (CUDA), and the
    table of the previous step's draws it reads the window from."""

    def __init__(self, draft: DraftModel, k: int, graphs: DraftGraphs | None = None) -> None:
        self.draft, self.k, self.graphs = draft, k, graphs

    @torch.inference_mode()
    def propose(self, f, data: torch.Tensor, offset: int, shape: DraftShape, resolve_pending, draws: torch.Tensor
                ) -> None:
        """Write the draft's proposals into the step's fields ``f`` (``StepTensors`` of a copy of its
        inputs, lagged sequences already resolved)."""
        p = draft_part(data, offset, shape)
        if shape.catchup_tokens:
            self._catch_up(p, shape)
        first = f.query_start[p["seq"]]
        rows = f.seq_rows[p["seq"]]
        ids, start = window(p, self.k, f.positions[first], resolve_pending(f.input_ids[first]), draws[rows])
        table = p["table"].view(shape.rows, shape.width)
        if self.graphs is not None:
            drafts = self.graphs.run_tensors(ids, start, p["kk"], table)
        else:
            drafts = uniform_drafts(self.draft, ids, start, p["kk"], table)
        proposed = drafts.reshape(-1)[p["write_from"]]
        f.input_ids[p["write_token"]] = proposed
        f.draft_token[p["write_sample"]] = proposed

    def _catch_up(self, p: dict[str, torch.Tensor], shape: DraftShape) -> None:
        """K/V of known tokens below the window that the draft's cache lacks (its drafts unused)."""
        d = self.draft
        table = p["cu_table"].view(shape.catchup_chunks, shape.width)
        inputs = AttentionInputs(p["cu_slots"], table, p["cu_query_start"], p["cu_seq_lens"], p["cu_pos"],
                                 shape.catchup_max_q, d.block_size)
        d.model.forward(p["cu_ids"], p["cu_pos"], d.kv_cache, step_attention(inputs))
