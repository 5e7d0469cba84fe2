"""Log-probabilities in float32 from the logits the sampler draws from (after penalties and logit
bias, before temperature): the chosen token's, its rank, and the k most likely tokens'."""
from __future__ import annotations

import torch

from tandem.worker.sampler import use_kernels

_CHUNK_ELEMENTS = 1 << 22  # rows per pass: the float32 temporaries stay about this size


def token_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """logits [N, V], chosen [N] -> logprob [N] float32, rank [N] int64 (1 = most likely),
    top_ids [N, k] int64, top_logprobs [N, k] float32.

    On CUDA a Triton kernel takes the row statistics and one ``topk`` the top k: a fixed number of
    launches whatever N. Elsewhere (and for float64 logits) the torch definition, in row chunks."""
    if use_kernels(logits):
        return _fused(logits, chosen, k)
    n_rows, vocab = logits.shape
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // vocab)
    parts = [_chunk(logits[i:i + rows_per_chunk], chosen[i:i + rows_per_chunk], k)
             for i in range(0, n_rows, rows_per_chunk)]
    if not parts:
        return _chunk(logits.float(), chosen, k)
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


def _fused(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    from tandem.kernels.logprobs import logprob_stats

    lse, logprob, rank = logprob_stats(logits, chosen)
    if k == 0:
        return {"logprob": logprob, "rank": rank, "top_ids": rank.new_empty(len(rank), 0),
                "top_logprobs": lse.new_empty(len(lse), 0)}
    # the top k of the logits as they are: widening to float32 is exact and keeps their order
    top = logits.topk(k, dim=-1)
    return {"logprob": logprob, "rank": rank, "top_ids": top.indices,
            "top_logprobs": top.values.float() - lse[:, None]}


def _chunk(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    x = logits.float()
    lse = x.logsumexp(dim=-1)
    chosen_logit = x.gather(1, chosen[:, None].long())[:, 0]
    top = x.topk(k, dim=-1) if k > 0 else None
    return {"logprob": chosen_logit - lse, "rank": (x > chosen_logit[:, None]).sum(dim=-1) + 1,
            "top_ids": top.indices if top is not None else x.new_zeros(x.shape[0], 0, dtype=torch.int64),
            "top_logprobs": top.values - lse[:, None] if top is not None else x.new_zeros(x.shape[0], 0)}
