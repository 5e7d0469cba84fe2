"""Log-probability statistics of one chosen token per row, in one Triton program per row.

``token_logprobs`` (``tandem.worker.logprobs``) needs, per row, the log-sum-exp of the logits, the
chosen token's logit and its rank. In torch that is a [rows, vocab] float32 temporary per op, so it
ran in row chunks: a batch-dependent number of launches. This kernel reads each row twice (its
maximum, then the sum of exponentials and the count of larger logits) and writes three numbers, so
its memory is O(rows) and it is one launch for any batch."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024
_NUM_WARPS = 8


@triton.jit
def _logprob_kernel(logits_ptr, row_stride, chosen_ptr, lse_ptr, logprob_ptr, rank_ptr, n_vocab,
                    BLOCK: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * row_stride
    offs = tl.arange(0, BLOCK)
    top = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(0, n_vocab, BLOCK):
        cols = start + offs
        top = tl.maximum(top, tl.load(row_ptr + cols, mask=cols < n_vocab, other=float("-inf")).to(tl.float32))
    m = tl.max(top, axis=0)
    m = tl.where(tl.abs(m) == float("inf"), 0.0, m)  # as torch.logsumexp: an infinite maximum is not subtracted
    chosen = tl.load(row_ptr + tl.load(chosen_ptr + row)).to(tl.float32)
    total = tl.zeros([BLOCK], tl.float32)
    above = tl.zeros([BLOCK], tl.int32)
    for start in range(0, n_vocab, BLOCK):
        cols = start + offs
        x = tl.load(row_ptr + cols, mask=cols < n_vocab, other=float("-inf")).to(tl.float32)
        total += tl.exp(x - m)
        above += (x > chosen).to(tl.int32)
    lse = tl.log(tl.sum(total, axis=0)) + m
    tl.store(lse_ptr + row, lse)
    tl.store(logprob_ptr + row, chosen - lse)
    tl.store(rank_ptr + row, tl.sum(above, axis=0).to(tl.int64) + 1)


def logprob_stats(logits: torch.Tensor, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [N, V] float32 / bf16 / fp16 (read as float32), chosen [N] int64 -> float32 log-sum-exp
    [N], float32 logprob of the chosen token [N], int64 rank [N] (1 + how many logits are larger)."""
    if logits.dim() != 2 or logits.stride(1) != 1 or logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"logits must be [N, V] float32/bf16/fp16 with unit column stride, got {logits.dtype} "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    if chosen.dtype != torch.int64 or chosen.shape != logits.shape[:1] or not chosen.is_contiguous():
        raise ValueError(f"chosen must be a contiguous [{logits.shape[0]}] int64 tensor")
    n_rows, n_vocab = logits.shape
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    logprob = torch.empty_like(lse)
    rank = torch.empty(n_rows, dtype=torch.int64, device=logits.device)
    if n_rows:
        _logprob_kernel[(n_rows,)](logits, logits.stride(0), chosen, lse, logprob, rank, n_vocab, BLOCK=_BLOCK,
                                   num_warps=_NUM_WARPS)
    return lse, logprob, rank
