"""Paged decode attention in Triton: one query token per sequence, K/V read straight from pages.

A program per (sequence, KV head[, split]) computes all query heads of that KV head together (GQA:
the group becomes the rows of the score tile) and walks the sequence's block table with an online
softmax (``attend_key_range``, shared with the varlen kernel), so it reads each needed K/V byte once.

Split-KV (flash-decoding): at small batch, B x Hkv programs leave most SMs idle on long contexts.
With num_splits > 1 each program takes one share of its sequence's keys, sized in-kernel from that
sequence's own length (at least MIN_SPLIT_KEYS, so short sequences use fewer splits and the rest
write a neutral partial), writes its unnormalised (max, sum, acc) in float32, and a second small
kernel combines the partials. num_splits is a host constant (part of a CUDA graph's key): see
``decode_num_splits``. Reference: the gather + SDPA path in ``tandem.model.attention``; tested on
CPU through Triton's interpreter."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels.pdl import pdl_launch, wait_then_release

from tandem.kernels.paged_varlen import (attend_key_range, cache_scales, dot_precision, kernel_window, padded_head_dim,
                                         score_scales)

# Keys per block, measured on an H100 (scripts/decode_sweep.py, scripts/kernel_bench.py): 128 for
# whole sequences per program (8B and 1B decode batches), 64 for split-KV's shorter shares.
BLOCK_N = 128
SPLIT_BLOCK_N = 64
MIN_SPLIT_KEYS = 256  # a split's share of keys: below this, the combine pass costs more than it saves
MAX_SPLITS = 64
WAVES = 2  # programs per SM that decode_num_splits aims for, so memory latency overlaps


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_context: int, num_sms: int) -> int:
    """Splits per sequence for a decode step: 1 when B x Hkv programs already fill the GPU or the
    contexts are short, else about WAVES programs per SM, as a power of two (fewer graph variants)."""
    programs = num_seqs * num_kv_heads
    if programs >= num_sms:
        return 1
    wanted = min(triton.cdiv(WAVES * num_sms, programs), max_context // MIN_SPLIT_KEYS, MAX_SPLITS)
    return 1 if wanted < 2 else 1 << (wanted.bit_length() - 1)


# The block-table width changes from step to step: specialising on it (== 1, % 16) would compile
# new variants mid-run, a stall of the whole batch.
@triton.jit(do_not_specialize=["stride_bt"])
def _paged_decode_kernel(q_ptr, cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, part_acc_ptr, part_stats_ptr,
                         qk_scale, cap, v_scale, window, stride_q_tok, stride_q_head, stride_kv, stride_slot,
                         stride_head, stride_bt,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                         DIM_PAD: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                         NUM_SPLITS: tl.constexpr, MIN_SPLIT: tl.constexpr, SOFTCAP: tl.constexpr,
                         PRECISION: tl.constexpr, PDL: tl.constexpr):
    wait_then_release(PDL)
    # KV heads vary fastest in launch order: the programs of one sequence's heads run together and
    # read the same cache rows (each head a slice of every slot) while they are open in DRAM.
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    seq = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, DIM_PAD)
    row_ok = rows < GROUP
    dim_ok = dims < HEAD_DIM
    io_mask = row_ok[:, None] & dim_ok[None, :]
    heads = kv_head * GROUP + rows
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_q_tok + heads[:, None] * stride_q_head + dims[None, :],
                mask=io_mask, other=0.0)
    # Keys before the window are skipped; the rest is cut into block-aligned shares, one per split.
    first = tl.maximum(seq_len - window, 0) // BLOCK_N * BLOCK_N
    share = tl.cdiv(tl.maximum(tl.cdiv(seq_len - first, NUM_SPLITS), MIN_SPLIT), BLOCK_N) * BLOCK_N
    lo = first + split * share
    hi = tl.minimum(lo + share, seq_len)
    pos = tl.zeros([GROUP_PAD], tl.int32) + seq_len - 1
    k_base = cache_ptr + kv_head * stride_head
    m_i, l_i, acc = attend_key_range(q, pos, seq_len - 1, seq_len - 1, lo, hi, window, qk_scale, cap, k_base,
                                     k_base + stride_kv, block_tables_ptr + seq * stride_bt, stride_slot, dims,
                                     dim_ok, PAGE, BLOCK_N, PRECISION, True, SOFTCAP)
    flat_heads = seq.to(tl.int64) * (tl.num_programs(0) * GROUP) + heads
    acc = acc * v_scale  # an fp8 cache holds V / v_scale (1 otherwise)
    if NUM_SPLITS == 1:
        tl.store(out_ptr + flat_heads[:, None] * HEAD_DIM + dims[None, :],
                 (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=io_mask)
    else:
        # An empty split leaves (max, sum, acc) = (-1e30, 0, 0), which the combine weighs as zero.
        part = flat_heads * NUM_SPLITS + split
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=io_mask)
        tl.store(part_stats_ptr + part * 2, m_i, mask=row_ok)
        tl.store(part_stats_ptr + part * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _combine_splits_kernel(part_acc_ptr, part_stats_ptr, out_ptr, NUM_SPLITS: tl.constexpr,
                           SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
                           PDL: tl.constexpr):
    wait_then_release(PDL)
    flat_head = tl.program_id(0).to(tl.int64)  # seq * Hq + head
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, DIM_PAD)
    split_ok = splits < NUM_SPLITS
    part = flat_head * NUM_SPLITS + splits
    m = tl.load(part_stats_ptr + part * 2, mask=split_ok, other=float("-inf"))
    l = tl.load(part_stats_ptr + part * 2 + 1, mask=split_ok, other=0.0)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :],
                  mask=split_ok[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)
    weight = tl.math.exp2(m - tl.max(m, 0))
    total = tl.sum(weight * l, 0)
    out = tl.sum(acc * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + flat_head * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


def paged_decode_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, page_size: int, scale: float,
                           sliding_window: int | None = None, num_splits: int = 1, block_n: int | None = None,
                           num_warps: int = 4, num_stages: int | None = None,
                           softcap: float | None = None, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """q: [B, Hq, D] (one token per sequence, the last of its seq_lens[b] keys); cache: [2, slots, Hkv, D]
    -> [B, Hq * D]. num_splits > 1 takes the split-KV path (see ``decode_num_splits``); block_n,
    num_warps and num_stages are the launch's tuning knobs (scripts/decode_sweep.py measures them);
    softcap: scores become softcap * tanh(scores / softcap) before the softmax (Gemma 2); k_scale,
    v_scale: the per-tensor scales of an fp8 cache (see ``paged_varlen_attention``)."""
    n_seqs, n_heads, head_dim = q.shape
    n_kv = cache.shape[2]
    group = n_heads // n_kv
    assert n_heads == group * n_kv and q.stride(2) == 1 and cache.stride(3) == 1 and num_splits >= 1
    out = torch.empty(n_seqs, n_heads, head_dim, dtype=q.dtype, device=q.device)
    k_scale, v_scale = cache_scales(cache, k_scale, v_scale)
    block_n = block_n or (BLOCK_N if num_splits == 1 else SPLIT_BLOCK_N)
    if num_splits == 1:
        part_acc = part_stats = out  # not touched by the single-pass kernel
    else:
        part_acc = torch.empty(n_seqs, n_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_stats = torch.empty(n_seqs, n_heads, num_splits, 2, dtype=torch.float32, device=q.device)
    dim_pad = padded_head_dim(head_dim)
    _paged_decode_kernel[(n_kv, num_splits, n_seqs)](
        q, cache, block_tables, seq_lens, out, part_acc, part_stats, *score_scales(scale, softcap, k_scale), v_scale,
        kernel_window(sliding_window),
        q.stride(0), q.stride(1), cache.stride(0), cache.stride(1), cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, DIM_PAD=dim_pad,
        PAGE=page_size, BLOCK_N=block_n, NUM_SPLITS=num_splits, MIN_SPLIT=MIN_SPLIT_KEYS,
        SOFTCAP=softcap is not None, PRECISION=dot_precision(q.dtype), num_warps=num_warps, **pdl_launch(q.device),
        **({"num_stages": num_stages} if num_stages else {}))
    if num_splits > 1:
        _combine_splits_kernel[(n_seqs * n_heads,)](
            part_acc, part_stats, out, NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits),
            HEAD_DIM=head_dim, DIM_PAD=dim_pad, num_warps=1, **pdl_launch(q.device))
    return out.view(n_seqs, n_heads * head_dim)
