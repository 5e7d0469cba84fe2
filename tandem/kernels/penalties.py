"""Repetition / presence / frequency penalties in two Triton launches around one torch sort.

``tandem.worker.logits_processing`` defines the penalties over each row's token history. Here:

1. ``_keys_kernel`` reads each sampled row's history and writes one int64 key per position,
   ``2 * token + is_output``; positions past what the row knows take the row's first token, as
   a prompt position (so they join a run that exists anyway and count nothing);
2. torch sorts the keys of each row: equal tokens form a run, their prompt positions first;
3. ``_apply_kernel`` visits the first element of each run, the only one that reads and writes the
   token's logit, so nothing races: its output count is the distance between the first keys >=
   2 * token + 1 and >= 2 * token + 2 (two binary searches in the sorted row), and it writes the
   penalised logit computed from the original one, as the torch definition rounds it.

Float32 logits; memory O(rows x span) for the keys."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024
_NUM_WARPS = 4


# ``span`` changes from step to step: no specialisation on it, so no compile mid-run
@triton.jit(do_not_specialize=["span"])
def _keys_kernel(history_ptr, history_stride, rows_ptr, prompt_lens_ptr, gen_index_ptr, keys_ptr, span,
                 BLOCK: tl.constexpr):
    row = tl.program_id(0)
    pos = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    hist = history_ptr + tl.load(rows_ptr + row) * history_stride
    prompt_len = tl.load(prompt_lens_ptr + row)
    n_known = prompt_len + tl.load(gen_index_ptr + row)
    token = tl.load(hist + pos, mask=pos < span, other=0).to(tl.int64)
    first = tl.load(hist).to(tl.int64)
    known = pos < n_known
    key = tl.where(known, 2 * token + ((pos >= prompt_len) & known).to(tl.int64), 2 * first)
    tl.store(keys_ptr + row.to(tl.int64) * span + pos, key, mask=pos < span)


@triton.jit
def _lower_bound(row_keys, span, target, n_steps):
    """Per lane: the first index of the sorted row whose key is >= target (span if none)."""
    lo = tl.zeros_like(target)
    hi = tl.zeros_like(target) + span
    for _ in range(n_steps):
        active = lo < hi
        mid = (lo + hi) // 2
        below = tl.load(row_keys + mid, mask=active, other=0) < target
        lo = tl.where(active & below, mid + 1, lo)
        hi = tl.where(active & ~below, mid, hi)
    return lo


@triton.jit(do_not_specialize=["span", "n_steps"])
def _apply_kernel(logits_ptr, logits_stride, n_vocab, keys_ptr, span, n_steps, prompt_lens_ptr, gen_index_ptr,
                  presence_ptr, frequency_ptr, repetition_ptr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    if tl.load(prompt_lens_ptr + row) + tl.load(gen_index_ptr + row) > 0:  # a padding row knows nothing
        pos = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        row_keys = keys_ptr + row.to(tl.int64) * span
        key = tl.load(row_keys + pos, mask=pos < span, other=0)
        token = key >> 1
        previous = tl.load(row_keys + pos - 1, mask=(pos > 0) & (pos < span), other=-2)
        leads = (pos < span) & ((previous >> 1) != token) & (token >= 0) & (token < n_vocab)
        count = (_lower_bound(row_keys, span, 2 * token + 2, n_steps)
                 - _lower_bound(row_keys, span, 2 * token + 1, n_steps)).to(tl.float32)
        logit_ptr = logits_ptr + row.to(tl.int64) * logits_stride + token
        logit = tl.load(logit_ptr, mask=leads, other=0.0)
        rp = tl.load(repetition_ptr + row)
        value = tl.where(logit > 0, tl.math.div_rn(logit, rp), logit * rp)
        value = value - (tl.load(presence_ptr + row) * (count > 0).to(tl.float32) + tl.load(frequency_ptr + row) * count)
        tl.store(logit_ptr, value, mask=leads)


def fused_penalties(logits: torch.Tensor, history: torch.Tensor, rows: torch.Tensor, prompt_lens: torch.Tensor,
                    gen_index: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor,
                    repetition: torch.Tensor, span: int) -> None:
    """In place on float32 logits [S, V] (contiguous rows): what ``apply_penalties`` does, for
    history int32 [rows, width], rows / prompt_lens / gen_index int64 [S], penalties float32 [S]."""
    if logits.dtype != torch.float32 or logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be [S, V] float32 with unit column stride, got {logits.dtype} "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    if history.dtype != torch.int32 or history.stride(1) != 1 or span > history.shape[1]:
        raise ValueError(f"history must be int32 [rows, >= {span}] with unit column stride")
    n_rows = logits.shape[0]
    if not n_rows or span <= 0:
        return
    keys = torch.empty(n_rows, span, dtype=torch.int64, device=logits.device)
    grid = (n_rows, triton.cdiv(span, _BLOCK))
    _keys_kernel[grid](history, history.stride(0), rows, prompt_lens, gen_index, keys, span, BLOCK=_BLOCK,
                       num_warps=_NUM_WARPS)
    keys = keys.sort(dim=1).values
    # no fused multiply-add: the result rounds as the torch definition's separate ops do
    _apply_kernel[grid](logits, logits.stride(0), logits.shape[1], keys, span, span.bit_length(), prompt_lens,
                        gen_index, presence, frequency, repetition, BLOCK=_BLOCK, num_warps=_NUM_WARPS,
                        enable_fp_fusion=False)
