"""The fused mixture-of-experts MLP: one grouped-GEMM Triton kernel, launched twice per layer.

The (token, slot) pairs are first sorted by expert, so each tile of ``block_m`` rows belongs to one
expert and reads only that expert's weights; experts no token routes to are never read, and tiles
past the rows in use exit at once. The sort is one Triton launch (``align``, a program per
expert), ``moe_align.align_tokens``'s result (its torch definition, some thirty small launches). Then:

1. gate-up: rows of ``hidden`` (slot // k) times the expert's ``w13`` [2I, H]; each program
   computes the gate tile and the matching up tile together and writes act(gate) * up, so the
   [T*k, 2I] product is never stored, only [T*k, I];
2. down: those rows times ``w2`` [H, I], the routing weight of the slot applied in the epilogue,
   written per slot [T*k, H];
3. the k slots of each token are summed in float32, in slot order (no atomics: the result does
   not depend on which other tokens share the step), and rounded once.

A route whose id is the expert count E is dropped (expert parallelism: an expert another rank
holds): the alignment puts it in no group, so neither GEMM computes it and its per-slot row is never
written; the k-sum reads the ids and counts such a slot as an exact zero without reading its row
(with k = 1 a dropped token's output row is zeroed). A rank's GEMMs thus cover only its own routes.

Quantized experts (``moe_weights``): FP8 experts (an FP8 checkpoint on the native FP8 path) and
4-bit experts (AWQ, GPTQ, compressed-tensors pack-quantized, ``--quantization int4``, where the
W4A16 GEMM runs) are read as stored and widened tile by tile in registers to the weight that
dequantizing at load stores, so the products equal the dequantized model's. The activations stay
16-bit (weight-only: the step is bound by reading the experts, which FP8 halves and 4 bits quarter).

Accumulation is float32. Each product is rounded to the model dtype where the reference
(``tandem.model.layers.experts.experts_reference``) rounds it, so bf16 results stay within a
last-bit difference of it. Every shape is static and nothing is read back to the host, so a
routed decode step can be captured in a CUDA graph."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels.moe_align import MoEAlignment, MoEBlocks, max_blocks, moe_blocks
from tandem.kernels.moe_weights import ExpertWeight, check_pair, weight_args, weight_ptrs, weight_tile
from tandem.kernels.paged_varlen import _tanh, dot_precision

ACT_CODES = {"silu": 0, "gelu_pytorch_tanh": 1}


# Arguments that change with the step's token count are not specialised on (Triton would compile
# a variant for 1 and for multiples of 16): the variants are then the tile tiers only, which the
# start-up's steps (worst case, graph captures, warm-up) can all meet before the first request.
@triton.jit(do_not_specialize=["num_slots"])
def _align_kernel(ids_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr, num_slots, num_experts,
                  BLOCK_M: tl.constexpr, BINS: tl.constexpr, CHUNK: tl.constexpr):
    """Program e: count every expert's slots (a histogram; each program counts them all, which is
    cheaper than a second launch), find its group's padded start (cumsum), write its tiles' expert
    ids and its padding sentinels, then place its slots in order (an exclusive cumsum of its hits).
    Rows past the padded total are left unwritten: the GEMM's tiles there exit before reading.
    Dropped slots (id E) fall in the spare bin E, as masked-off loads do: no program places them."""
    e = tl.program_id(0)
    bins = tl.arange(0, BINS)
    counts = tl.zeros((BINS,), dtype=tl.int32)
    for first in range(0, num_slots, CHUNK):
        slots = first + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + slots, mask=slots < num_slots, other=num_experts)  # a spare bin
        counts += tl.histogram(ids.to(tl.int32), BINS)
    counts = tl.where(bins < num_experts, counts, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    starts = tl.cumsum(padded, axis=0) - padded
    start = tl.sum(tl.where(bins == e, starts, 0), axis=0)
    count = tl.sum(tl.where(bins == e, counts, 0), axis=0)
    tiles = (count + BLOCK_M - 1) // BLOCK_M
    if e == 0:
        tl.store(num_padded_ptr, tl.sum(padded, axis=0))
    pad = start + count + tl.arange(0, BLOCK_M)
    tl.store(sorted_ids_ptr + pad, num_slots, mask=pad < start + tiles * BLOCK_M)
    for first in range(0, tiles, CHUNK):
        tile = first + tl.arange(0, CHUNK)
        tl.store(expert_ids_ptr + start // BLOCK_M + tile, e, mask=tile < tiles)
    placed = 0  # slots of expert e placed by earlier chunks
    for first in range(0, num_slots, CHUNK):
        slots = first + tl.arange(0, CHUNK)
        hit = (tl.load(ids_ptr + slots, mask=slots < num_slots, other=num_experts) == e).to(tl.int32)
        rank = placed + tl.cumsum(hit, axis=0) - hit
        tl.store(sorted_ids_ptr + start + rank, slots, mask=hit != 0)
        placed += tl.sum(hit, axis=0)


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoEAlignment:
    """``moe_align.align_tokens`` in one launch of one program per expert: the same buffers, equal
    up to the rows in use (``num_padded``, and the tiles holding them); the rest is unspecified.
    Ids lie in [0, E]; slots with id E (dropped routes) are placed nowhere."""
    n = topk_ids.numel()
    rows = max_blocks(n, num_experts, block_m) * block_m
    sorted_ids = torch.empty(rows, dtype=torch.int32, device=topk_ids.device)
    expert_ids = torch.empty(rows // block_m, dtype=torch.int32, device=topk_ids.device)
    num_padded = torch.empty(1, dtype=torch.int32, device=topk_ids.device)
    chunk = min(1024, max(16, triton.next_power_of_2(n)))
    _align_kernel[(num_experts,)](topk_ids.contiguous(), sorted_ids, expert_ids, num_padded, n, num_experts,
                                  BLOCK_M=block_m, BINS=triton.next_power_of_2(num_experts + 1), CHUNK=chunk,
                                  num_warps=4 if chunk <= 256 else 8)
    return MoEAlignment(sorted_ids, expert_ids, num_padded, block_m)


@triton.jit
def _activation(x, ACT: tl.constexpr):
    if ACT == 0:
        return x / (1.0 + tl.exp(-x))  # silu
    return 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))  # gelu, tanh form


@triton.jit(do_not_specialize=["num_slots", "num_blocks"])
def _grouped_gemm_kernel(a_ptr, b_ptr, c_ptr, weights_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr,
                         n_out, k_in, num_slots, a_row_div, num_blocks, up_offset, stride_am, stride_be,
                         stride_bn, stride_bk, stride_cm, s_ptr, z_ptr, scale_bn, scale_bk, s_up_offset, stride_se,
                         stride_sn, stride_sk, GATED: tl.constexpr, ACT: tl.constexpr,
                         MUL_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
                         W_KIND: tl.constexpr, SCALE_ROW: tl.constexpr, HAS_ZEROS: tl.constexpr):
    """C[slot, n] = epilogue(sum_k A[slot // a_row_div, k] * B[expert, n, k]) for the slots of one
    row tile and a band of output columns. GATED: B also holds the up rows ``up_offset`` elements
    further, and the epilogue is act(gate) * up. W_KIND (``moe_weights``): B dense, FP8 with a
    float32 scale grid ``s`` (one scale per ``scale_bn`` rows and ``scale_bk`` columns of an expert),
    or 4-bit words with per-group scales ``s`` and zero points ``z`` (HAS_ZEROS; else 8), the up
    rows' scales ``s_up_offset`` elements further; quantized tiles are dequantized in registers."""
    pid = tl.program_id(0)
    bands = tl.cdiv(n_out, BLOCK_N)
    per_group = GROUP_M * bands
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return  # a tile past the rows in use: buffers have their worst-case size
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(sorted_ids_ptr + rows).to(tl.int64)
    row_ok = slot < num_slots  # the sentinel (num_slots) pads each expert's group
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_out
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (slot // a_row_div)[:, None] * stride_am + ks[None, :]
    b_ptrs, b_step = weight_ptrs(b_ptr + expert * stride_be, cols, stride_bn, stride_bk, BLOCK_K, W_KIND)
    s_off = expert * stride_se + (cols // scale_bn)[None, :].to(tl.int64) * stride_sn  # zero points: the same
    s_ptrs, z_ptrs = s_ptr + s_off, z_ptr + s_off
    dt = c_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv(k_in, BLOCK_K)):
        k_ok = ks < k_in - kk * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = weight_tile(b_ptrs, s_ptrs, z_ptrs, k_ok, col_ok, kk * BLOCK_K, scale_bk, stride_sk, dt, BLOCK_K,
                        BLOCK_N, W_KIND, SCALE_ROW, HAS_ZEROS)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if GATED:
            b_up = weight_tile(b_ptrs + up_offset, s_ptrs + s_up_offset, z_ptrs + s_up_offset, k_ok, col_ok,
                               kk * BLOCK_K, scale_bk, stride_sk, dt, BLOCK_K, BLOCK_N, W_KIND, SCALE_ROW, HAS_ZEROS)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += b_step
    out = acc.to(dt).to(tl.float32)  # the reference's matmul output, in the model dtype
    if GATED:
        out = _activation(out, ACT).to(dt).to(tl.float32) * acc_up.to(dt).to(tl.float32)
    if MUL_WEIGHT:
        out = out * tl.load(weights_ptr + slot, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    c_ptrs = c_ptr + slot[:, None] * stride_cm + cols[None, :]
    tl.store(c_ptrs, out.to(dt), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _sum_slots_kernel(per_slot_ptr, ids_ptr, out_ptr, hidden, num_experts, TOP_K: tl.constexpr,
                      BLOCK: tl.constexpr):
    """out[t] = sum_j per_slot[t * k + j] in float32, slot by slot: the same order whatever the batch.
    A dropped slot (id E) adds zero; its row, which no GEMM wrote, is not read."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < hidden
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        # the columns to read: all of them for a kept slot, none for a dropped one
        width = tl.where(tl.load(ids_ptr + token * TOP_K + j) < num_experts, hidden, 0)
        acc += tl.load(per_slot_ptr + (token * TOP_K + j) * hidden + cols, mask=cols < width, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * hidden + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _zero_dropped_kernel(out_ptr, ids_ptr, hidden, num_experts, BLOCK: tl.constexpr):
    """k = 1, where the per-slot rows are the output: zero the rows of dropped tokens (id E), which
    no GEMM wrote; the others are left as they are."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    width = tl.where(tl.load(ids_ptr + token) < num_experts, 0, hidden)  # the columns to zero
    zeros = tl.zeros((BLOCK,), dtype=out_ptr.dtype.element_ty)
    tl.store(out_ptr + token * hidden + cols, zeros, mask=cols < width)


def _grouped_gemm(a: torch.Tensor, b: ExpertWeight, out: torch.Tensor, alignment: MoEAlignment,
                  blocks: MoEBlocks, n_out: int, a_row_div: int, weights: torch.Tensor | None,
                  act: int | None) -> None:
    """One launch over every row tile (those past ``alignment.num_padded`` exit) and column band.
    ``b`` dense, FP8 or 4-bit (``moe_weights.weight_args`` gives its arguments)."""
    w = weight_args(b, n_out, blocks.block_k)
    grid = (alignment.num_blocks * triton.cdiv(n_out, blocks.block_n),)
    _grouped_gemm_kernel[grid](
        a, w.b, out, weights if weights is not None else out, alignment.sorted_ids, alignment.expert_ids,
        alignment.num_padded, n_out, w.k_in, out.shape[0], a_row_div, alignment.num_blocks, w.up_offset,
        a.stride(0), *w.strides_b, out.stride(0), w.s, w.z, *w.scale_block, w.s_up_offset, *w.strides_s,
        GATED=act is not None, ACT=act or 0, MUL_WEIGHT=weights is not None, BLOCK_M=blocks.block_m,
        BLOCK_N=blocks.block_n, BLOCK_K=w.block_k, GROUP_M=blocks.group_m, PRECISION=dot_precision(a.dtype),
        W_KIND=w.kind, SCALE_ROW=w.scale_row, HAS_ZEROS=w.has_zeros, num_warps=blocks.num_warps,
        num_stages=blocks.num_stages)


def _check(hidden: torch.Tensor, w13: ExpertWeight, w2: ExpertWeight, topk_weights: torch.Tensor,
           topk_ids: torch.Tensor, activation: str) -> None:
    if activation not in ACT_CODES:
        raise ValueError(f"fused MoE: activation {activation!r} is not implemented (supported: {sorted(ACT_CODES)})")
    (n_exp, two_i, h), (t, k) = w13.shape, topk_ids.shape
    if hidden.shape != (t, h) or w2.shape != (n_exp, h, two_i // 2) or topk_weights.shape != (t, k):
        raise ValueError(f"fused MoE: shapes disagree: hidden {tuple(hidden.shape)}, w13 {tuple(w13.shape)}, "
                         f"w2 {tuple(w2.shape)}, topk_weights {tuple(topk_weights.shape)}, topk_ids {(t, k)}")
    check_pair(w13, w2, hidden.dtype)


def fused_experts(hidden: torch.Tensor, w13: ExpertWeight, w2: ExpertWeight, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, activation: str = "silu", blocks: MoEBlocks | None = None) -> torch.Tensor:
    """[T, H] -> [T, H], as ``experts_reference`` (same arguments and layouts, ids in [0, E] where
    E = ``w13.shape[0]`` marks a dropped route); ``blocks`` overrides the tile table (tests, tuning).
    FP8 or 4-bit experts (``moe_weights``' protocols, w13 and w2 alike) are read as stored and
    dequantized in registers."""
    _check(hidden, w13, w2, topk_weights, topk_ids, activation)
    (t, k), (n_exp, two_i, h) = topk_ids.shape, w13.shape
    inter = two_i // 2
    if t == 0:
        return hidden.new_empty(0, h)
    blocks = blocks or moe_blocks(t, k, n_exp)
    alignment = align(topk_ids, n_exp, blocks.block_m)
    hidden = hidden.contiguous()
    act_out = torch.empty(t * k, inter, dtype=hidden.dtype, device=hidden.device)
    _grouped_gemm(hidden, w13, act_out, alignment, blocks, inter, k, None, ACT_CODES[activation])
    per_slot = torch.empty(t * k, h, dtype=hidden.dtype, device=hidden.device)
    weights = topk_weights.reshape(-1).float().contiguous()
    _grouped_gemm(act_out, w2, per_slot, alignment, blocks, h, 1, weights, None)
    ids, block = topk_ids.contiguous(), min(1024, triton.next_power_of_2(h))
    if k == 1:
        _zero_dropped_kernel[(t, triton.cdiv(h, block))](per_slot, ids, h, n_exp, BLOCK=block)
        return per_slot
    out = torch.empty(t, h, dtype=hidden.dtype, device=hidden.device)
    _sum_slots_kernel[(t, triton.cdiv(h, block))](per_slot, ids, out, h, n_exp, TOP_K=k, BLOCK=block)
    return out
