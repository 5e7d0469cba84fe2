"""Top-k / top-p cutoffs without a sort: one Triton program per row, memory O(rows).

The sampler folds top-k and top-p into one number per row, the smallest logit the row keeps
(``tandem.worker.sampler.top_k_top_p_cutoff`` defines it with a sort). Sorting [rows, vocab] needs
[rows, vocab] temporaries, so the torch definition runs in row chunks: a batch-dependent number of
launches. Here each row finds the same value by radix search on its logits' bit patterns (float32
reordered as uint32 keys, so comparing keys compares the floats), 4 bits per pass over the row:

* top-k: the largest key K with count(key >= K) >= k, i.e. the k-th largest logit (ties counted);
* top-p: over the tokens top-k keeps, with weights exp(x / t - max) (the softmax numerators at the
  row's temperature), the largest key K whose weight at or above it reaches top_p times the total:
  the last logit of the sorted definition's kept prefix (its exclusive prefix mass is below top_p).

Passes over the row: 1 (max, min), 8 for top-k, 1 (softmax total) + 8 for top-p. The sums run in
a fixed order, so results are deterministic; they may differ from the sorted cumulative sum (in
torch's order) where the prefix mass is within float rounding of top_p."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 256  # row elements per iteration: [BLOCK, 16] accumulators, 16 registers a thread at 8 warps
_NUM_WARPS = 8


@triton.jit
def _key(x):
    """float32 -> uint32 of the same order (-0.0 first becomes +0.0, which compares equal)."""
    u = (x + 0.0).to(tl.uint32, bitcast=True)
    return u ^ ((0 - (u >> 31)) | 0x80000000)


@triton.jit
def _float(key):
    """The inverse of _key."""
    u = key ^ ((0 - ((key >> 31) ^ 1)) | 0x80000000)
    return u.to(tl.float32, bitcast=True)


@triton.jit
def _load(row_ptr, cols, n_vocab):
    return tl.load(row_ptr + cols, mask=cols < n_vocab, other=float("-inf")).to(tl.float32)


@triton.jit
def _weight(x, key, floor, cols, n_vocab, t, y_max, BY_MASS: tl.constexpr):
    """An element's weight in a search: 0 outside the row or below ``floor``; else 1, or BY_MASS its
    softmax numerator at temperature t (correctly rounded division, as torch's)."""
    valid = (cols < n_vocab) & (key >= floor)
    if BY_MASS:
        return tl.where(valid, tl.exp(tl.math.div_rn(x, t) - y_max), 0.0)
    return valid.to(tl.float32)


@triton.jit
def _search(row_ptr, n_vocab, floor, need, t, y_max, BY_MASS: tl.constexpr, BLOCK: tl.constexpr):
    """The largest key K such that the elements with key >= K (and >= floor) weigh at least ``need``
    (0 where none does): 8 passes, each fixing 4 more bits of K from the top."""
    digits = tl.arange(0, 16).to(tl.uint32)
    offs = tl.arange(0, BLOCK)
    prefix = tl.zeros([], tl.uint32)
    for p in tl.static_range(8):
        shift = 28 - 4 * p
        candidates = prefix | (digits << shift)
        acc = tl.zeros([BLOCK, 16], tl.float32)
        for start in range(0, n_vocab, BLOCK):
            cols = start + offs
            x = _load(row_ptr, cols, n_vocab)
            key = _key(x)
            w = _weight(x, key, floor, cols, n_vocab, t, y_max, BY_MASS)
            acc += tl.where(key[:, None] >= candidates[None, :], w[:, None], 0.0)
        reached = tl.sum(acc, axis=0) >= need
        prefix = prefix | (tl.max(tl.where(reached, digits, 0), axis=0) << shift)
    return prefix


@triton.jit
def _softmax_total(row_ptr, n_vocab, floor, t, y_max, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_vocab, BLOCK):
        cols = start + offs
        x = _load(row_ptr, cols, n_vocab)
        acc += _weight(x, _key(x), floor, cols, n_vocab, t, y_max, True)
    return tl.sum(acc, axis=0)


@triton.jit
def _cutoff_kernel(logits_ptr, row_stride, temperature_ptr, top_k_ptr, top_p_ptr, out_ptr, n_vocab,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * row_stride
    temperature = tl.load(temperature_ptr + row)
    top_k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    cutoff = tl.full([], float("-inf"), tl.float32)
    # greedy rows ignore their cutoff in the sampler; rows without top-k and top-p keep everything
    if (temperature > 0.0) & ((top_k > 0) | (top_p < 1.0)):
        offs = tl.arange(0, BLOCK)
        hi = tl.full([BLOCK], float("-inf"), tl.float32)
        lo = tl.full([BLOCK], float("inf"), tl.float32)
        for start in range(0, n_vocab, BLOCK):
            cols = start + offs
            x = _load(row_ptr, cols, n_vocab)
            hi = tl.maximum(hi, x)
            lo = tl.minimum(lo, tl.where(cols < n_vocab, x, float("inf")))
        x_max = tl.max(hi, axis=0)
        floor = _key(tl.min(lo, axis=0))  # top-k off (or k >= vocab): every token stays
        if (top_k > 0) & (top_k < n_vocab):
            floor = _search(row_ptr, n_vocab, floor, top_k.to(tl.float32), 1.0, 0.0, False, BLOCK)
        if top_p < 1.0:
            # max x / t over the kept tokens is the row's: division by t > 0 is monotone
            y_max = tl.math.div_rn(x_max, temperature)
            need = top_p * _softmax_total(row_ptr, n_vocab, floor, temperature, y_max, BLOCK)
            found = _search(row_ptr, n_vocab, floor, need, temperature, y_max, True, BLOCK)
            floor = tl.maximum(floor, found)  # found = 0: rounding left the kept mass short of top_p
        cutoff = _float(floor)
    tl.store(out_ptr + row, cutoff)


def fused_cutoff(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                 top_p: torch.Tensor) -> torch.Tensor:
    """[S, V] float32 / bf16 / fp16 logits (read as float32) -> [S] float32 cutoffs, as
    ``top_k_top_p_cutoff`` for random rows; -inf for greedy rows (the sampler ignores theirs).

    temperature, top_p: [S] float32; top_k: [S] int64. No host syncs, no [S, V] temporaries."""
    if logits.dim() != 2 or logits.stride(1) != 1 or logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"logits must be [S, V] float32/bf16/fp16 with unit column stride, got {logits.dtype} "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    for name, tensor, dtype in (("temperature", temperature, torch.float32), ("top_k", top_k, torch.int64),
                                ("top_p", top_p, torch.float32)):
        if tensor.dtype != dtype or tensor.shape != logits.shape[:1] or not tensor.is_contiguous():
            raise ValueError(f"{name} must be a contiguous [{logits.shape[0]}] {dtype} tensor")
    n_rows, n_vocab = logits.shape
    out = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows:
        _cutoff_kernel[(n_rows,)](logits, logits.stride(0), temperature, top_k, top_p, out, n_vocab, BLOCK=_BLOCK,
                                  num_warps=_NUM_WARPS)
    return out
