"""A step's grammar bitmask applied to its logits in one Triton launch.

``logits[rows[i], t] = -inf`` wherever bit ``t % 32`` of ``bitmask[i, t // 32]`` is clear (xgrammar's
layout, ``tandem.worker.grammar_mask``). Each program covers ``BLOCK`` tokens of one masked row: it
reads that stretch of the row's mask words and writes only the banned logits, never reading the
logits (a JSON grammar bans most of the vocabulary, so the bytes are the writes)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 4096


@triton.jit
def _apply_kernel(logits_ptr, logits_stride, rows_ptr, mask_ptr, mask_stride, vocab, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    token = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = token < vocab
    words = tl.load(mask_ptr + i.to(tl.int64) * mask_stride + token // 32, mask=inside, other=-1)
    banned = ((words >> (token % 32)) & 1) == 0
    row = tl.load(rows_ptr + i).to(tl.int64)
    minus_inf = tl.full([BLOCK], float("-inf"), logits_ptr.dtype.element_ty)
    tl.store(logits_ptr + row * logits_stride + token, minus_inf, mask=inside & banned)


def fused_grammar_mask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place; ``logits`` [R, V] with unit stride over V, ``rows`` [n] int, ``bitmask`` [n, words] int32."""
    n, vocab = bitmask.shape[0], logits.shape[1]
    if n == 0:
        return
    grid = (n, triton.cdiv(vocab, _BLOCK))
    _apply_kernel[grid](logits, logits.stride(0), rows, bitmask, bitmask.stride(0), vocab, BLOCK=_BLOCK)
