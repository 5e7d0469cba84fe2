"""Paged varlen attention in Triton: one flat batch of query tokens from many sequences (first
prefill chunks, later chunks over cached context, decode tokens), K/V read in place from the pages.

A program takes one tile of a sequence's chunk for one KV head: its BLOCK_M rows are
BLOCK_M // GROUP consecutive tokens x the GROUP query heads that share the KV head, so each K/V
block it loads serves the whole GQA group. It walks the sequence's keys in BLOCK_N blocks with an
online softmax in float32, from the window start of the tile's first token to the causal end of
its last; the blocks every row may see skip the mask. The grid depends only on host ints
(max_q, Hkv, B) and empty tiles return at once, so a launch can be captured in a CUDA graph.

``attend_key_range`` is shared with the decode kernel (``paged_decode``), which is the one-token
case of the same walk. Tested against a gather + SDPA reference on CPU through Triton's
interpreter (tests/test_triton_varlen.py)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels.fp8_formats import FP8_FORMATS

LOG2E = 1.4426950408889634  # scores are kept in log2 units so the softmax can use exp2
NO_WINDOW = 1 << 30  # stands for "no sliding window": longer than any context, and fits in int32
BLOCK_N = 64  # keys per block


def padded_head_dim(head_dim: int) -> int:
    """tl.arange and tl.dot need power-of-two extents of at least 16; the padding is masked off."""
    return max(16, triton.next_power_of_2(head_dim))


def dot_precision(dtype: torch.dtype) -> str:
    """float32 models get exact products: tf32 (Triton's default for them) costs ~1e-3 relative error."""
    return "ieee" if dtype == torch.float32 else "tf32"


def kernel_window(sliding_window: int | None) -> int:
    """The kernels always apply a window: no window is one longer than any context."""
    return NO_WINDOW if sliding_window is None else sliding_window


def score_scales(scale: float, softcap: float | None, k_scale: float = 1.0) -> tuple[float, float]:
    """(qk_scale, cap) as the kernels take them: scores in log2 units are q.k * qk_scale, or with a
    soft-cap c, c * tanh(q.k * scale / c) * LOG2E = cap * tanh(q.k * qk_scale). An fp8 cache holds
    K / k_scale: k_scale joins the score scale (one multiply per score, none per key element)."""
    scale = scale * k_scale
    if softcap is None:
        return scale * LOG2E, 0.0
    return scale / softcap, softcap * LOG2E


def cache_scales(cache: torch.Tensor, k_scale: float, v_scale: float) -> tuple[float, float]:
    """The scales a kernel applies: an fp8 cache holds K / k_scale and V / v_scale; a cache of the
    model dtype holds K and V themselves, whatever scales the layer carries (checkpoint scales serve
    only an fp8 cache)."""
    return (k_scale, v_scale) if cache.dtype in FP8_FORMATS else (1.0, 1.0)


@triton.jit
def _tanh(x):
    """tanh from exp2 of a non-positive argument (no overflow); Triton has no portable tanh."""
    e = tl.math.exp2(-2.8853900817779268 * tl.abs(x))  # exp(-2|x|)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _softmax_update(s, v, m_i, l_i, acc, PRECISION: tl.constexpr):
    """One online-softmax step over a key block; s: [M, N] scores in log2 units, hidden keys -inf."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _key_slots(bt_row, block, hi, keys, key_ok, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Cache slots of the keys block, block + 1, ... (block is a multiple of BLOCK_N). The page id is
    int64, which keeps slot * stride from overflowing on large caches."""
    if BLOCK_N % PAGE == 0:
        # Whole pages: one block-table load per page, not per key (measured 2-3% on decode steps).
        firsts = block + tl.arange(0, BLOCK_N // PAGE) * PAGE
        pages = tl.load(bt_row + firsts // PAGE, mask=firsts < hi, other=0)
        return tl.reshape(pages[:, None] * PAGE + tl.arange(0, PAGE)[None, :], [BLOCK_N])
    page = tl.load(bt_row + keys // PAGE, mask=key_ok, other=0)
    return page * PAGE + keys % PAGE


@triton.jit
def _attend_blocks(q, pos, m_i, l_i, acc, start, stop, hi, window, qk_scale, cap, k_base, v_base, bt_row,
                   stride_slot, dims, dim_ok, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                   MASKED: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """Key blocks starting at start, start + BLOCK_N, ... below stop; keys at or past hi are never read.
    Scores are soft-capped (``score_scales``) before the mask and the softmax when SOFTCAP."""
    for block in range(start, stop, BLOCK_N):
        keys = block + tl.arange(0, BLOCK_N)
        key_ok = keys < hi
        offsets = _key_slots(bt_row, block, hi, keys, key_ok, PAGE, BLOCK_N)[:, None] * stride_slot + dims[None, :]
        kv_mask = key_ok[:, None] & dim_ok[None, :]
        # an fp8 cache's values widen exactly to q's dtype; its scales are applied outside the loop
        k = tl.load(k_base + offsets, mask=kv_mask, other=0.0).to(q.dtype)
        v = tl.load(v_base + offsets, mask=kv_mask, other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if SOFTCAP:
            s = _tanh(s) * cap
        if MASKED:
            ahead = pos[:, None] - keys[None, :]
            s = tl.where((ahead >= 0) & (ahead < window) & key_ok[None, :], s, float("-inf"))
        m_i, l_i, acc = _softmax_update(s, v, m_i, l_i, acc, PRECISION)
    return m_i, l_i, acc


@triton.jit
def attend_key_range(q, pos, pos_first, pos_last, lo, hi, window, qk_scale, cap, k_base, v_base, bt_row,
                     stride_slot, dims, dim_ok, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                     PRECISION: tl.constexpr, MASK_ALL: tl.constexpr, SOFTCAP: tl.constexpr):
    """Rows q ([M, DIM_PAD], row r at absolute position pos[r], all within [pos_first, pos_last])
    attend the keys of [lo, hi) that are causal and inside the window; lo is a multiple of BLOCK_N.
    Returns the unnormalised (max, sum, acc) of the online softmax, in log2 units.

    Keys in [pos_last - window + 1, pos_first] are visible to every row, so unless MASK_ALL the
    whole blocks there skip the mask and only the window edge and the diagonal pay for it. Memory-
    bound callers (decode) pass MASK_ALL: one loop instead of three needs far fewer registers."""
    m_i = tl.full([q.shape[0]], -1.0e30, tl.float32)  # finite: a row that sees no key yet gets p = 0, not NaN
    l_i = tl.zeros([q.shape[0]], tl.float32)
    acc = tl.zeros([q.shape[0], q.shape[1]], tl.float32)
    if MASK_ALL:
        return _attend_blocks(q, pos, m_i, l_i, acc, lo, hi, hi, window, qk_scale, cap, k_base, v_base, bt_row,
                              stride_slot, dims, dim_ok, PAGE, BLOCK_N, True, SOFTCAP, PRECISION)
    full_lo = tl.minimum(tl.maximum(tl.cdiv(pos_last - window + 1, BLOCK_N) * BLOCK_N, lo), hi)
    full_hi = tl.maximum(tl.minimum((pos_first + 1) // BLOCK_N, hi // BLOCK_N) * BLOCK_N, full_lo)
    m_i, l_i, acc = _attend_blocks(q, pos, m_i, l_i, acc, lo, full_lo, hi, window, qk_scale, cap, k_base, v_base,
                                   bt_row, stride_slot, dims, dim_ok, PAGE, BLOCK_N, True, SOFTCAP, PRECISION)
    m_i, l_i, acc = _attend_blocks(q, pos, m_i, l_i, acc, full_lo, full_hi, hi, window, qk_scale, cap, k_base,
                                   v_base, bt_row, stride_slot, dims, dim_ok, PAGE, BLOCK_N, False, SOFTCAP, PRECISION)
    m_i, l_i, acc = _attend_blocks(q, pos, m_i, l_i, acc, full_hi, hi, hi, window, qk_scale, cap, k_base, v_base,
                                   bt_row, stride_slot, dims, dim_ok, PAGE, BLOCK_N, True, SOFTCAP, PRECISION)
    return m_i, l_i, acc


# The block-table width changes from step to step: specialising on it (== 1, % 16) would compile
# new variants mid-run, a stall of the whole batch.
@triton.jit(do_not_specialize=["stride_bt"])
def _paged_varlen_kernel(q_ptr, cache_ptr, block_tables_ptr, query_start_ptr, seq_lens_ptr, out_ptr,
                         qk_scale, cap, v_scale, window, stride_q_tok, stride_q_head, stride_kv, stride_slot,
                         stride_head, stride_bt, stride_o_tok,
                         GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
                         PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    TOKENS: tl.constexpr = BLOCK_M // GROUP
    # Later tiles of a chunk see more keys: starting them first keeps long programs off the tail.
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq).to(tl.int32)
    q_len = tl.load(query_start_ptr + seq + 1).to(tl.int32) - q_start
    first_tok = tile * TOKENS
    if first_tok >= q_len:
        return
    context = tl.load(seq_lens_ptr + seq).to(tl.int32) - q_len  # keys before this chunk
    last_tok = tl.minimum(first_tok + TOKENS, q_len) - 1
    rows = tl.arange(0, BLOCK_M)
    tok = first_tok + rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    row_ok = tok <= last_tok  # also drops the rows past TOKENS * GROUP when GROUP does not divide BLOCK_M
    # Padding rows borrow the last token's position so that every row sees at least one key.
    pos = context + tl.minimum(tok, last_tok)
    pos_first = context + first_tok
    pos_last = context + last_tok

    dims = tl.arange(0, DIM_PAD)
    dim_ok = dims < HEAD_DIM
    io_mask = row_ok[:, None] & dim_ok[None, :]
    flat_tok = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + (flat_tok * stride_q_tok + heads * stride_q_head)[:, None] + dims[None, :],
                mask=io_mask, other=0.0)
    k_base = cache_ptr + kv_head * stride_head
    lo = tl.maximum(pos_first - window + 1, 0) // BLOCK_N * BLOCK_N
    m_i, l_i, acc = attend_key_range(q, pos, pos_first, pos_last, lo, pos_last + 1, window, qk_scale, cap, k_base,
                                     k_base + stride_kv, block_tables_ptr + seq * stride_bt, stride_slot, dims,
                                     dim_ok, PAGE, BLOCK_N, PRECISION, False, SOFTCAP)
    out = acc * v_scale / l_i[:, None]  # v_scale: an fp8 cache holds V / v_scale (1 otherwise)
    tl.store(out_ptr + (flat_tok * stride_o_tok + heads * HEAD_DIM)[:, None] + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=io_mask)


def _tile_rows(max_q: int, group: int) -> int:
    """Rows per program (BLOCK_M): enough tokens x heads for a tensor-core tile, but small when every
    chunk is short so that decode-like steps do not compute mostly padding."""
    return max(16, min(64, triton.next_power_of_2(max_q * group)), triton.next_power_of_2(group))


def paged_varlen_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                           query_start: torch.Tensor, seq_lens: torch.Tensor, page_size: int, scale: float,
                           sliding_window: int | None, max_q: int, softcap: float | None = None,
                           k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Causal attention of a flat batch of query chunks over their paged context.

    q: [T, Hq, D], the K/V of these tokens already in the cache (its last dim contiguous; token and
    head strides are free, e.g. a view of a fused projection); cache: [2, slots, Hkv, D];
    block_tables: [B, max_blocks] int64; query_start: [B + 1] int64 (seq b owns q[query_start[b]:
    query_start[b + 1]], possibly empty); seq_lens: [B] int64, context length including this step's
    tokens, which are the sequence's last ones; max_q: host bound on the longest chunk (sizes the
    grid; a smaller value silently drops tokens); softcap: scores become softcap * tanh(scores /
    softcap) before the softmax (Gemma 2); k_scale, v_scale: an fp8 cache holds K / k_scale
    and V / v_scale (per-tensor), the kernel widens it to q's dtype and scales the scores and the
    output. Returns [T, Hq * D] in q's dtype."""
    n_tokens, n_heads, head_dim = q.shape
    n_kv = cache.shape[2]
    group = n_heads // n_kv
    assert n_heads == group * n_kv and q.stride(2) == 1 and cache.stride(3) == 1
    out = torch.empty(n_tokens, n_heads * head_dim, dtype=q.dtype, device=q.device)
    k_scale, v_scale = cache_scales(cache, k_scale, v_scale)
    n_seqs = block_tables.shape[0]
    if n_tokens == 0 or n_seqs == 0 or max_q == 0:
        return out
    block_m = _tile_rows(max_q, group)
    n_tiles = triton.cdiv(max_q, block_m // group)
    _paged_varlen_kernel[(n_tiles, n_kv, n_seqs)](
        q, cache, block_tables, query_start, seq_lens, out, *score_scales(scale, softcap, k_scale), v_scale,
        kernel_window(sliding_window),
        q.stride(0), q.stride(1), cache.stride(0), cache.stride(1), cache.stride(2), block_tables.stride(0),
        out.stride(0), GROUP=group, HEAD_DIM=head_dim, DIM_PAD=padded_head_dim(head_dim), PAGE=page_size,
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, SOFTCAP=softcap is not None, PRECISION=dot_precision(q.dtype),
        num_warps=4)
    return out
