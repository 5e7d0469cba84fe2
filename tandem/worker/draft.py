"""A draft model for speculative decoding: a second model on the seam (any checkpoint or ``random:``
preset sharing the target's tokenizer) that proposes k tokens greedily (its argmax: q is one-hot,
so the engine's exact-match verification keeps the target's tokens, see ``tandem.spec.verify``).

It keeps its own paged KV cache and its own block lists (not the target's block tables: the two
caches have other shapes, and the target's blocks are freed and shared by rules the draft need not
follow). Per request it remembers which tokens its cache holds; each call computes what changed
since (the tokens accepted and drawn in the last step, from the first that differs from what it fed
itself) and then k - 1 one-token steps. K/V of rejected proposals is overwritten the same way.

It runs when the engine asks for proposals, before it plans a speculating step; each draft token is
fed back on the device, and the host waits once for all of them (speculating steps are planned
after the previous step was processed in any case: docs/pipeline.md)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tandem.model.attention import AttentionInputs, step_attention
from tandem.model.base import CausalLM


@dataclass
class _DraftSeq:
    fed: list[int] = field(default_factory=list)  # the tokens whose K/V the draft cache holds, by position
    known: int = 0  # the request's tokens at the previous call: fed agrees with them that far
    blocks: list[int] = field(default_factory=list)


class DraftProposer:
    def __init__(self, model: CausalLM, kv_cache: torch.Tensor, block_size: int, max_model_len: int,
                 vocab_size: int) -> None:
        self.model, self.kv_cache, self.block_size = model, kv_cache, block_size
        self.max_model_len, self.vocab_size = max_model_len, vocab_size
        num_blocks = kv_cache.shape[2] // block_size
        self.free = list(range(num_blocks - 1, 0, -1))  # block 0: padding
        self.seqs: dict[str, _DraftSeq] = {}

    def release(self, request_id: str) -> None:
        seq = self.seqs.pop(request_id, None)
        if seq is not None:
            self.free += seq.blocks

    def propose(self, requests: list) -> list[list[int]]:
        """``requests``: ``tandem.spec.proposer.ProposalRequest``s -> up to max_proposals tokens each."""
        out: list[list[int]] = [[] for _ in requests]
        live = []  # (index, state, first position to compute, k)
        for i, r in enumerate(requests):
            seq = self.seqs.setdefault(r.request_id, _DraftSeq())
            n = len(r.tokens)
            k = min(r.max_proposals, self.max_model_len - n)
            if k <= 0 or not self._reserve(seq, n - 1 + k):
                continue  # no room in the draft cache: this request does not speculate this step
            live.append((i, seq, min(_common_prefix(seq.fed, r.tokens, seq.known), n - 1), k))
            seq.fed, seq.known = list(r.tokens), n
        if not live:
            return out
        # first: each request's tokens from the first one its cache lacks, through its last; then
        # one token a step, each draft fed back on the device (one wait for all of them, at the end)
        drafts = [self._forward([(seq, requests[i].tokens[valid:], valid) for i, seq, valid, _ in live])]
        ks = np.array([k for *_, k in live])
        for step in range(1, int(ks.max())):
            going = np.flatnonzero(ks > step)
            chunks = [(live[j][1], None, len(requests[live[j][0]].tokens) - 1 + step) for j in going.tolist()]
            fed = drafts[-1] if going.size == len(live) else drafts[-1][torch.as_tensor(going, device=drafts[-1].device)]
            drafted = torch.zeros_like(drafts[0])
            drafted[torch.as_tensor(going, device=drafted.device)] = self._forward(chunks, fed)
            drafts.append(drafted)
        table = torch.stack(drafts, dim=1).tolist()  # [live, max k]
        for (i, seq, _, k), row in zip(live, table):
            out[i] = row[:k]
            seq.fed += row[:k - 1]  # the drafts fed back: their K/V is in the cache
        return out

    def _reserve(self, seq: _DraftSeq, num_tokens: int) -> bool:
        need = -(-num_tokens // self.block_size) - len(seq.blocks)
        if need > len(self.free):
            return False
        for _ in range(max(0, need)):
            seq.blocks.append(self.free.pop())
        return True

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
