"""A draft model's proposals from known tokens, on the host's call: the reference for the path the
engine runs. The engine's draft proposes on the device, as the first op of the step that verifies
its proposals (``draft_plan`` on the host, ``draft_window`` on the device: docs/pipeline.md,
"Speculative decoding"), reading the tokens of the step in flight where they are, on the device.
This proposer is what that path computes once every step is processed: the tests compare the
device's window with the one read here off the known tokens (``tests/test_draft_overlap.py``), and
the fixed-shape function with the varlen path (``tests/test_draft_graphs.py``).

The draft is any model on the seam with the target's vocabulary (a checkpoint or ``random:``
preset sharing the target's tokenizer) proposing k tokens greedily (its argmax: q is one-hot, so the
engine's exact-match verification keeps the target's tokens, see ``tandem.spec.verify``). It keeps
its own paged KV cache and its own block lists (``draft_blocks``). Per request it remembers which
tokens its cache holds (``fed``).

Each call proposes through one fixed-shape function (``draft_graphs.uniform_drafts``): every row
feeds its last K + 1 tokens (K: the call's largest k), which covers what a request's cache lacks in
steady state (the accepted proposals and the draw: 1 .. k + 1 tokens; K/V it already holds is
rewritten with the same token's), then K - 1 one-token steps, each draft fed back on the device.
On CUDA that function replays as a CUDA graph per padded batch size (``DraftGraphs``); elsewhere,
or with graphs off, it runs eagerly. A row that lacks more (its first call: the prompt) is first
caught up by one eager varlen forward of the tokens before its last K + 1; a row shorter than K + 1
tokens takes the eager varlen path (``_propose_varlen``: its new tokens, then k - 1 one-token
steps). The host waits once for all drafts."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tandem.model.attention import AttentionInputs, step_attention
from tandem.model.base import CausalLM
from tandem.worker.draft_blocks import DraftBlocks
from tandem.worker.draft_graphs import DraftGraphs, DraftModel, run_eager


@dataclass
class _DraftSeq:
    fed: list[int] = field(default_factory=list)  # the tokens whose K/V the draft cache holds, by position
    known: int = 0  # the request's tokens at the previous call: fed agrees with them that far
    blocks: list[int] = field(default_factory=list)


@dataclass
class _Row:
    index: int  # in the call's requests
    seq: _DraftSeq
    tokens: list[int]
    valid: int  # the first position whose K/V the cache lacks
    k: int  # proposals this row keeps


class DraftProposer:
    overlaps = False  # known tokens only: a loop with this proposer would process every step first
    on_device = False

    def __init__(self, model: CausalLM, kv_cache: torch.Tensor, block_size: int, max_model_len: int,
                 vocab_size: int, cuda_graphs: bool = False, max_seqs: int = 1, uniform: bool = True) -> None:
        """``cuda_graphs``: replay the proposal function as graphs of up to ``max_seqs`` rows (CUDA
        only); ``uniform`` False: every row takes the varlen path (the reference the tests compare)."""
        self.model, self.kv_cache, self.block_size = model, kv_cache, block_size
        self.max_model_len, self.vocab_size, self.uniform = max_model_len, vocab_size, uniform
        self.blocks = DraftBlocks(kv_cache.shape[2] // block_size, block_size)
        self.seqs: dict[str, _DraftSeq] = {}
        self.draft = DraftModel(model, kv_cache, block_size, vocab_size)
        self.graphs = None
        if cuda_graphs and kv_cache.device.type == "cuda" and getattr(model, "supports_cuda_graphs", True):
            self.graphs = DraftGraphs(self.draft, max_seqs, -(-max_model_len // block_size))

    def release(self, request_id: str) -> None:
        seq = self.seqs.pop(request_id, None)
        if seq is not None:
            self.blocks.release(seq.blocks)

    def propose(self, requests: list) -> list[list[int]]:
        """``requests``: ``tandem.spec.proposer.ProposalRequest``s -> up to max_proposals tokens each."""
        out: list[list[int]] = [[] for _ in requests]
        live = self._admit(requests)
        if not live:
            return out
        k = max(r.k for r in live)
        fits = [self.uniform and len(r.tokens) > k for r in live]  # k + 1 tokens to feed
        uniform = [r for r, f in zip(live, fits) if f]
        varlen = [r for r, f in zip(live, fits) if not f]
        parts = ([self._propose_uniform(uniform, k)] if uniform else []) + \
                ([self._propose_varlen(varlen, k)] if varlen else [])
        table = torch.cat(parts).tolist()  # [live, k]: the one wait for the host
        for r, row in zip(uniform + varlen, table):
            out[r.index] = row[:r.k]
            r.seq.fed += row[:r.k - 1]  # the drafts fed back: their K/V is in the cache
        return out

    def _admit(self, requests: list) -> list[_Row]:
        """The rows that speculate this call (room in the draft cache), with what each cache lacks."""
        live = []
        for i, r in enumerate(requests):
            seq = self.seqs.setdefault(r.request_id, _DraftSeq())
            n = len(r.tokens)
            k = min(r.max_proposals, self.max_model_len - n)
            if k <= 0 or not self.blocks.reserve(seq.blocks, n - 1 + k):
                continue  # no room in the draft cache: this request does not speculate this step
            live.append(_Row(i, seq, r.tokens, min(_common_prefix(seq.fed, r.tokens, seq.known), n - 1), k))
            seq.fed, seq.known = list(r.tokens), n
        return live

    @torch.inference_mode()
    def _propose_uniform(self, rows: list[_Row], k: int) -> torch.Tensor:
        """Rows of at least k + 1 tokens -> drafts [rows, k] on the device (see the module's doc)."""
        behind = [(r.seq, r.tokens[r.valid:len(r.tokens) - k - 1], r.valid) for r in rows
                  if r.valid < len(r.tokens) - k - 1]
        if behind:
            self._forward(behind)  # catch-up: K/V before the last k + 1 tokens (its drafts unused)
        start = np.array([len(r.tokens) - k - 1 for r in rows], np.int64)
        ids = np.array([r.tokens[-k - 1:] for r in rows], np.int64)
        kk = np.array([r.k for r in rows], np.int64)
        table = np.zeros((len(rows), max(len(r.seq.blocks) for r in rows)), np.int64)
        for i, r in enumerate(rows):
            table[i, :len(r.seq.blocks)] = r.seq.blocks
        if self.graphs is not None:
            return self.graphs.run(ids, start, kk, table)
        return run_eager(self.draft, ids, start, kk, table)

    def _propose_varlen(self, rows: list[_Row], k: int) -> torch.Tensor:
        """Each row's tokens from the first its cache lacks, through its last; then one token a step,
        each draft fed back on the device -> drafts [rows, k] (zeros past a row's own k)."""
        drafts = [self._forward([(r.seq, r.tokens[r.valid:], r.valid) for r in rows])]
        ks = np.array([r.k for r in rows])
        for step in range(1, k):
            going = np.flatnonzero(ks > step)
            drafted = torch.zeros_like(drafts[0])
            if going.size:
                chunks = [(rows[j].seq, None, len(rows[j].tokens) - 1 + step) for j in going.tolist()]
                index = torch.as_tensor(going, device=drafted.device)
                fed = drafts[-1] if going.size == len(rows) else drafts[-1][index]
                drafted[index] = self._forward(chunks, fed)
            drafts.append(drafted)
        return torch.stack(drafts, dim=1)

    @torch.inference_mode()
    def _forward(self, chunks: list[tuple[_DraftSeq, list[int] | None, int]],
                 fed: torch.Tensor | None = None) -> torch.Tensor:
        """One varlen forward of (sequence, token ids, first position) chunks -> each chunk's next
        token (the argmax after its last), on the device. ``fed``: one token per chunk, on the device
        (the chunks' ids are None)."""
        dev, bs = self.kv_cache.device, self.block_size
        lengths = np.array([1 if ids is None else len(ids) for _, ids, _ in chunks], np.int64)
        positions = np.concatenate([np.arange(start, start + n) for (_, _, start), n in zip(chunks, lengths)])
        width = max(len(seq.blocks) for seq, _, _ in chunks)
        table = np.zeros((len(chunks), width), np.int64)
        for row, (seq, _, _) in enumerate(chunks):
            table[row, :len(seq.blocks)] = seq.blocks
        owner = np.repeat(np.arange(len(chunks)), lengths)
        slots = table[owner, positions // bs] * bs + positions % bs
        query_start = np.concatenate([[0], np.cumsum(lengths)])
        seq_lens = np.array([start for _, _, start in chunks], np.int64) + lengths
        as_tensor = lambda a: torch.as_tensor(a, dtype=torch.int64, device=dev)  # noqa: E731
        ids = fed if fed is not None else as_tensor(np.concatenate([np.asarray(ids, np.int64) for _, ids, _ in chunks]))
        pos = as_tensor(positions)
        inputs = AttentionInputs(as_tensor(slots), as_tensor(table), as_tensor(query_start), as_tensor(seq_lens),
                                 pos, int(lengths.max()), bs)
        hidden = self.model.forward(ids, pos, self.kv_cache, step_attention(inputs))
        logits = self.model.compute_logits(hidden[as_tensor(query_start[1:] - 1)])
        return logits[:, :self.vocab_size].argmax(dim=-1)


def _common_prefix(a: list[int], b: list[int], start: int) -> int:
    """Where ``a`` and ``b`` first differ, given that they agree before ``start`` (a request's tokens
    only grow: only the proposals fed since differ, a few tokens)."""
    n = min(len(a), len(b))
    i = min(start, n)
    while i < n and a[i] == b[i]:
        i += 1
    return i
