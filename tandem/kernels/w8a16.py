"""W8A16: y = x @ W^T with W stored as FP8 (e4m3) and x left in 16 bits, for decode sizes.

A decode step's linear layers are bound by reading the weights; quantizing the activations to FP8
first (to use FP8 tensor cores) costs a launch per layer and buys nothing there. Here each program
loads its [BLOCK_K, BLOCK_N] tile of FP8 weights, widens it to the activations' dtype in registers
(e4m3 -> bf16 is exact) and feeds ``tl.dot`` with float32 accumulation. Scales: one per output row
(applied once, after the K loop) or one per [bn, bk] block (applied per K tile; a tile never
straddles two blocks).

Few rows give few output tiles, so K is split over ``split_k`` programs whose float32 partial sums
the tile's last program adds in a fixed order (``split_k.finish_tile``: the result does not depend
on timing), with the bias. Tiles come from the shapes and the SM count alone (``w8a16_tiles``): no host read-back, so
a decode step stays capturable in a CUDA graph."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tandem.kernels import num_sms
from tandem.kernels.paged_varlen import dot_precision
from tandem.kernels.pdl import pdl_launch, wait_then_release
from tandem.kernels.split_k import MAX_TILES, finish_tile, tile_counters

MAX_ROWS = 64  # above this the FP8 tensor-core GEMMs win (the activations are worth quantizing)


@dataclass(frozen=True)
class W8Tiles:
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    swap: bool = False  # the weight tile as the dot's first operand (``_k_tile``)


def _largest_step(width: int, largest: int) -> int:
    """The largest power of two <= ``largest`` dividing ``width`` (a K tile inside one scale block)."""
    step = largest
    while width % step:
        step //= 2
    return step


def w8a16_tiles(m: int, n: int, k: int, scale_block_k: int | None, sms: int = 132) -> W8Tiles:
    """Tiles for ``m`` <= MAX_ROWS rows, from a sweep on an H100 at the 8B shapes in CUDA graphs
    (``scripts/quant_tune.py``, benchmarks/RESULTS.md): narrow column tiles and deep K tiles for a
    few rows, wider ones as rows grow; K split (a power of two) until the programs fill about six
    waves of the device's ``sms`` (four at 32 rows, two above), each split keeping >= 4 K tiles."""
    block_n = 32 if m <= 16 else 64 if m <= 32 else 128
    block_k = _largest_step(scale_block_k or k, 256 if m <= 16 else 128)
    waves = 6 if m <= 16 else 4 if m <= 32 else 2
    n_tiles, k_tiles, split = triton.cdiv(n, block_n), triton.cdiv(k, block_k), 1
    while n_tiles * split * 2 <= waves * sms and k_tiles // (split * 2) >= 4:
        split *= 2
    # 17-32 rows: W x^T (wgmma with the widened weights from registers) won every 8B GEMM at 32 rows
    return W8Tiles(block_n, block_k, split, 4, 3, swap=16 < m <= 32)


@triton.jit
def _k_tile(acc, a_ptr, b_ptr, s_ptr, rows, cols, k0, ks, row_ok, col_ok, k, stride_am, scale_kblocks, scale_bn,
            scale_bk, ROWWISE: tl.constexpr, PRECISION: tl.constexpr, SWAP: tl.constexpr):
    """``acc`` plus x[rows, K tile] @ W[cols, K tile]^T (times the tile's block scales): [rows, cols],
    or [cols, rows] with ``SWAP``, which computes W x^T so that the widened weight tile is the dot's
    first operand, which Hopper's wgmma takes from registers, and the few rows are its N; without
    it fewer than 64 rows fall back to mma.sync with the weights shuffled through shared memory."""
    kk = k0 + ks
    if SWAP:
        x = tl.load(a_ptr + rows[None, :] * stride_am + kk[:, None], mask=row_ok[None, :] & (kk[:, None] < k),
                    other=0.0)
        w = tl.load(b_ptr + cols[:, None] * k + kk[None, :], mask=col_ok[:, None] & (kk[None, :] < k),
                    other=0.0).to(x.dtype)
        lhs, rhs = w, x
    else:
        x = tl.load(a_ptr + rows[:, None] * stride_am + kk[None, :], mask=row_ok[:, None] & (kk[None, :] < k),
                    other=0.0)
        lhs = x
        rhs = tl.load(b_ptr + cols[None, :] * k + kk[:, None], mask=col_ok[None, :] & (kk[:, None] < k),
                      other=0.0).to(x.dtype)  # [BLOCK_K, BLOCK_N] of the row-major [n, k] weight
    if ROWWISE:
        acc = tl.dot(lhs, rhs, acc, input_precision=PRECISION)
    else:
        sb = tl.load(s_ptr + (cols // scale_bn) * scale_kblocks + k0 // scale_bk, mask=col_ok, other=0.0)
        if SWAP:
            acc += tl.dot(lhs, rhs, input_precision=PRECISION) * sb[:, None]
        else:
            acc += tl.dot(lhs, rhs, input_precision=PRECISION) * sb[None, :]
    return acc


@triton.jit(do_not_specialize=["m"])
def _w8a16_kernel(a_ptr, b_ptr, s_ptr, out_ptr, parts_ptr, bias_ptr, counters_ptr, m, n, k, stride_am, stride_split,
                  scale_kblocks, scale_bn, scale_bk, k_per_split, splits, ROWWISE: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                  SWAP: tl.constexpr, PDL: tl.constexpr):
    wait_then_release(PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    row_ok, col_ok = rows < m, cols < n
    ks = tl.arange(0, BLOCK_K)
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    start = split * k_per_split
    for k0 in range(start, tl.minimum(k, start + k_per_split), BLOCK_K):
        acc = _k_tile(acc, a_ptr, b_ptr, s_ptr, rows, cols, k0, ks, row_ok, col_ok, k, stride_am, scale_kblocks,
                      scale_bn, scale_bk, ROWWISE, PRECISION, SWAP)
    if SWAP:
        acc = tl.trans(acc)
    if ROWWISE:
        acc *= tl.load(s_ptr + cols, mask=col_ok, other=0.0)[None, :]
    finish_tile(acc, out_ptr, parts_ptr, bias_ptr, counters_ptr, rows[:, None] * n + cols[None, :],
                cols[None, :] + 0 * rows[:, None], row_ok[:, None] & col_ok[None, :], split, splits, stride_split,
                HAS_BIAS)


def w8a16_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None,
                 bias: torch.Tensor | None = None, tiles: W8Tiles | None = None) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS, 16-bit or float32) @ FP8 ``weight`` [N, K]^T -> [M, N] in x's dtype.
    ``scale``: float32 [N] (``block`` None) or [ceil(N/bn), ceil(K/bk)] for ``block`` (bn, bk);
    ``tiles`` overrides the tile table (tests, tuning)."""
    m, k = x.shape
    n = weight.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"w8a16 is for at most {MAX_ROWS} rows, got {m}")
    if weight.shape[1] != k or not (weight.is_contiguous() and x.stride(1) == 1):
        raise ValueError(f"w8a16: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not match, or are not "
                         "contiguous along K")
    bn, bk = block if block is not None else (1, k)
    tiles = tiles or w8a16_tiles(m, n, k, None if block is None else bk, num_sms(x.device))
    if bk % tiles.block_k:
        raise ValueError(f"w8a16: a K tile of {tiles.block_k} straddles the scale blocks of width {bk}")
    block_m = min(MAX_ROWS, max(16, triton.next_power_of_2(m)))
    k_tiles = triton.cdiv(k, tiles.block_k)
    per_split = triton.cdiv(k_tiles, tiles.split_k) * tiles.block_k
    splits = triton.cdiv(k, per_split)
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    parts = torch.empty((splits, m, n), device=x.device, dtype=torch.float32) if splits > 1 else out
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, tiles.block_n), splits)
    if grid[0] * grid[1] > MAX_TILES:
        raise ValueError(f"w8a16: {grid[0] * grid[1]} output tiles, more than the {MAX_TILES} split-K counters")
    _w8a16_kernel[grid](x, weight, scale, out, parts, bias if bias is not None else out, tile_counters(x.device), m, n,
                        k, x.stride(0), m * n, scale.shape[-1] if block else 1, bn, bk, per_split, splits,
                        ROWWISE=block is None, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=tiles.block_n,
                        BLOCK_K=tiles.block_k, PRECISION=dot_precision(x.dtype), SWAP=tiles.swap, num_warps=tiles.num_warps,
                        num_stages=tiles.num_stages, **pdl_launch(x.device))
    return out
