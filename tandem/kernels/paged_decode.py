"""Paged decode attention in Triton: one query token per sequence, K/V read straight from pages.

One program per (sequence, KV head) computes all query heads of that KV head together (GQA: the
group becomes the rows of the score tile), walks the sequence's block table up to its own length
with an online softmax, and so reads each needed K/V byte once. Reference: the gather + SDPA path
in ``tandem.model.attention``; tested against it on CPU through Triton's interpreter."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, scale, window,
                         stride_q_tok, stride_q_head, stride_kv_slot, stride_kv_head, stride_bt,
                         stride_o_tok, stride_o_head,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                         DIM_PAD: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, DIM_PAD)
    row_ok = rows < GROUP
    dim_ok = dims < HEAD_DIM
    heads = kv_head * GROUP + rows
    q = tl.load(q_ptr + seq * stride_q_tok + heads[:, None] * stride_q_head + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    first = tl.maximum(seq_len - window, 0) // BLOCK_N * BLOCK_N  # keys before the window are skipped
    for start in range(first, seq_len, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = (keys < seq_len) & (keys >= seq_len - window)
        page = tl.load(block_tables_ptr + seq * stride_bt + keys // PAGE, mask=key_ok, other=0)
        slots = page * PAGE + keys % PAGE
        kv_offsets = slots[:, None] * stride_kv_slot + kv_head * stride_kv_head + dims[None, :]
        kv_mask = key_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + seq * stride_o_tok + heads[:, None] * stride_o_head + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def paged_decode_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, page_size: int, scale: float,
                           sliding_window: int | None = None) -> torch.Tensor:
    """q: [B, Hq, D] (one token per sequence); cache: [2, slots, Hkv, D] -> [B, Hq * D]."""
    n_seqs, n_heads, head_dim = q.shape
    n_kv = cache.shape[2]
    group = n_heads // n_kv
    k, v = cache[0], cache[1]
    out = torch.empty_like(q)
    window = sliding_window if sliding_window is not None else 1 << 30
    _paged_decode_kernel[(n_seqs, n_kv)](
        q, k, v, block_tables, seq_lens, out, scale, window,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        DIM_PAD=max(16, triton.next_power_of_2(head_dim)), PAGE=page_size, BLOCK_N=64, num_warps=4)
    return out.view(n_seqs, n_heads * head_dim)
